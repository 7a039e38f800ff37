"""Retries, fallbacks, deadlines and cancellation, through the real server, SDK and a fake upstream."""

import logging
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import pytest
from llm_helpers import TEST_KEY, collect, fake_model, openai_settings, request, user

from duplex.common.errors import RETRY_AFTER_KEY
from duplex.llm.v1 import llm_pb2
from llm_service.providers.openai_provider import retry_after_seconds
from llm_service.resilience import RetryPolicy
from tests.fake_openai import FakeOpenAI, FakeReply

# Seconds within which a cancel or a deadline must reach the upstream.
PROMPT = 0.5


async def test_a_429_is_retried_after_its_retry_after(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(FakeReply.error(429, headers={"Retry-After": "1"}), FakeReply(chunks=["Fine", " now."]))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.text == "Fine now."
    first, second = fake_openai.requests
    assert second.received_at - first.received_at >= 0.95


async def test_a_500_is_retried(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(FakeReply.error(500), FakeReply.error(502), FakeReply(chunks=["Back."]))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.text == "Back."
    assert reply.started.model == "fake-gpt"
    assert len(fake_openai.requests) == 3


async def test_a_connection_dropped_before_the_first_token_is_retried(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(FakeReply(drop_after=0), FakeReply(chunks=["Again."]))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.kinds == ["started", "chunk", "finished"]
    assert reply.text == "Again."
    assert len(fake_openai.requests) == 2


async def test_final_errors_are_not_retried(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, fallbacks=["local-demo"])]))
    fake_openai.script(FakeReply.error(400))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(running.stub, request(user("Hi")))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(fake_openai.requests) == 1


async def test_exhausted_retries_fall_back_to_the_next_model(start_llm, fake_openai: FakeOpenAI):
    primary = fake_model(fake_openai, "primary", fallbacks=["backup", "local-demo"])
    running = await start_llm(openai_settings([primary, fake_model(fake_openai, "backup")]))
    fake_openai.script(*[FakeReply.error(503)] * 3, FakeReply(chunks=["From", " the", " backup."]))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.started.model == "backup"
    assert reply.text == "From the backup."
    assert [sent.body["model"] for sent in fake_openai.requests] == ["upstream-primary"] * 3 + ["upstream-backup"]


async def test_the_local_demo_can_be_the_last_resort(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, fallbacks=["local-demo"])]))
    fake_openai.default_reply = FakeReply.error(500)

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.started.model == "local-demo"
    assert "demo model" in reply.text


async def test_without_fallbacks_the_last_error_is_returned(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_retry_max_attempts=2))
    fake_openai.default_reply = FakeReply.error(503, headers={"Retry-After": "0.05"})

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(running.stub, request(user("Hi")))

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_openai.requests) == 2


async def test_a_mid_stream_failure_is_unavailable_after_the_partial_reply(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, fallbacks=["local-demo"])]))
    fake_openai.script(FakeReply(chunks=["One", " two", " three", " four"], drop_after=2))

    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in running.stub.Generate(request(user("Hi")), timeout=5):
            received.append(response)

    assert [response.WhichOneof("kind") for response in received] == ["started", "chunk", "chunk"]
    assert "".join(response.chunk.text for response in received) == "One two"
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    # Neither retried nor handed to the fallback: the client already has part of this reply.
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(FakeReply(chunks=["x"] * 1000, pace=0.02), id="streaming"),
        pytest.param(FakeReply(stall_after=2), id="stalled mid-stream"),
    ],
)
@pytest.mark.parametrize("coalesce_window_ms", [0, 15])
async def test_a_cancel_closes_the_upstream_request_promptly(
    start_llm, fake_openai: FakeOpenAI, reply, coalesce_window_ms: float
):
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_coalesce_window_ms=coalesce_window_ms))
    fake_openai.script(reply)
    call = running.stub.Generate(request(user("Hi")))
    for _ in range(3):  # started and two chunks
        await call.read()

    cancelled_at = time.monotonic()
    call.cancel()

    [disconnected_at] = await fake_openai.wait_for_disconnects(timeout=2)
    assert disconnected_at - cancelled_at < PROMPT


async def test_a_cancel_before_the_upstream_answers_closes_its_request(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(FakeReply(stall_before_headers=True))
    call = running.stub.Generate(request(user("Hi")))
    await fake_openai.wait_for_requests()

    cancelled_at = time.monotonic()
    call.cancel()

    [disconnected_at] = await fake_openai.wait_for_disconnects(timeout=2)
    assert disconnected_at - cancelled_at < PROMPT


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(FakeReply(stall_after=1), id="stalled mid-stream"),
        pytest.param(FakeReply(stall_before_headers=True), id="stalled before answering"),
    ],
)
async def test_the_deadline_ends_the_call_and_its_upstream_request(start_llm, fake_openai: FakeOpenAI, reply):
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_coalesce_window_ms=15))
    fake_openai.script(reply)
    began = time.monotonic()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in running.stub.Generate(request(user("Hi")), timeout=0.5):
            pass

    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [disconnected_at] = await fake_openai.wait_for_disconnects(timeout=2)
    assert disconnected_at - began < 0.5 + PROMPT
    assert len(fake_openai.requests) == 1


async def test_no_retry_waits_past_the_deadline(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_retry_max_delay_seconds=10))
    fake_openai.script(FakeReply.error(429, headers={"Retry-After": "3"}))
    began = time.monotonic()

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect_with_timeout(running.stub, 1.0)

    # Waiting 3 s cannot fit in a 1 s deadline: the rate limit is reported at once, with its hint.
    assert time.monotonic() - began < 0.5
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_AFTER_KEY, "3000") in tuple(failure.value.trailing_metadata())
    assert len(fake_openai.requests) == 1


async def test_a_retry_after_longer_than_the_max_delay_is_not_waited_for(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, fallbacks=["local-demo"])]))
    fake_openai.script(FakeReply.error(429, headers={"Retry-After": "60"}))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.started.model == "local-demo"
    assert len(fake_openai.requests) == 1


async def collect_with_timeout(stub, timeout: float) -> list[llm_pb2.GenerateResponse]:
    return [response async for response in stub.Generate(request(user("Hi")), timeout=timeout)]


async def test_the_key_never_appears_in_messages_or_logs(start_llm, fake_openai: FakeOpenAI, caplog):
    caplog.set_level(logging.DEBUG)
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_retry_max_attempts=1))
    # Upstreams quote keys back (OpenAI: "Incorrect API key provided: sk-..."); none of it may pass.
    echoing = f"Incorrect API key provided: {TEST_KEY}"
    fake_openai.script(
        FakeReply.error(401, echoing),
        FakeReply.error(400, echoing),
        FakeReply.error(429, echoing),
        FakeReply.error(500, echoing),
        FakeReply(drop_after=1),
        FakeReply(),
    )
    details = []
    for _ in range(6):
        try:
            await collect(running.stub, request(user("Hi")))
        except grpc.aio.AioRpcError as error:
            details.append(error.details())
    await fake_openai.close()
    with pytest.raises(grpc.aio.AioRpcError) as unreachable:
        await collect(running.stub, request(user("Hi")))
    details.append(unreachable.value.details())

    assert len(details) == 6
    assert "[redacted]" in details[1]
    for text in (*details, caplog.text):
        assert TEST_KEY not in text
        assert TEST_KEY[8:20] not in text
        assert "Traceback" not in text


def test_retry_after_is_read_in_seconds_milliseconds_or_as_an_http_date():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    in_ninety_seconds = format_datetime(now + timedelta(seconds=90), usegmt=True)

    assert retry_after_seconds({"retry-after": "2"}, now) == 2
    assert retry_after_seconds({"retry-after": "1.5"}, now) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    assert retry_after_seconds({"retry-after": in_ninety_seconds}, now) == pytest.approx(90)
    assert retry_after_seconds({"retry-after": format_datetime(now - timedelta(hours=1), usegmt=True)}, now) == 0
    assert retry_after_seconds({"retry-after": "soon"}, now) is None
    assert retry_after_seconds({"retry-after": "-1"}, now) is None
    assert retry_after_seconds({}, now) is None


def test_backoff_is_exponential_with_full_jitter_and_capped():
    policy = RetryPolicy(max_attempts=6, base_delay=0.1, max_delay=1.0)
    rng = random.Random(7)

    for attempts_made, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0)]:
        delays = [policy.delay(attempts_made, None, rng) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
        # Full jitter spreads the whole range rather than clustering at the ceiling.
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9
    assert policy.delay(6, None, rng) is None
    assert policy.delay(1, 0.7, rng) == 0.7
    assert policy.delay(1, 1.5, rng) is None
