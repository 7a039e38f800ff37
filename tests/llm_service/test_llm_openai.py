"""The openai provider through the real server and the real `openai` SDK, against a fake HTTP upstream."""

import json

import grpc
import pytest
from llm_helpers import (
    CALCULATOR,
    TEST_KEY,
    calling,
    collect,
    fake_model,
    openai_settings,
    request,
    system,
    tool_result,
    user,
)

from duplex.common.errors import RETRY_AFTER_KEY
from duplex.llm.v1 import llm_pb2
from tests.fake_openai import FakeOpenAI, FakeReply, FakeToolCall, fake_embedding

QUESTION = user("What is 12*(3+4)?")
CALCULATION = '{"expression": "12*(3+4)"}'


async def test_a_reply_streams_through_the_sdk_with_usage_from_the_final_chunk(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))

    reply = await collect(running.stub, request(system("Be brief."), user("Hi")))

    assert reply.kinds == ["started", "chunk", "chunk", "chunk", "chunk", "chunk", "finished"]
    assert reply.text == "Hello from the fake model."
    assert reply.started.model == "fake-gpt"
    assert (reply.finished.prompt_tokens, reply.finished.completion_tokens) == (11, 5)
    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_STOP
    [sent] = fake_openai.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert sent.body["model"] == "upstream-fake-gpt"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "tools" not in sent.body and "max_tokens" not in sent.body


async def test_a_two_round_tool_call(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(
        FakeReply(chunks=["Let me calculate."], tool_calls=[FakeToolCall("calculator", CALCULATION, "call_1", 4)]),
        FakeReply(chunks=["12*(3+4)", " is", " 84."]),
    )

    first = await collect(running.stub, request(QUESTION, tools=[CALCULATOR]))

    assert first.kinds == ["started", "chunk", "tool_call", "finished"]
    assert first.finished.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    [call] = first.tool_calls
    assert (call.id, call.name, json.loads(call.arguments_json)) == ("call_1", "calculator", {"expression": "12*(3+4)"})
    assert fake_openai.requests[0].body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate an arithmetic expression.",
                "parameters": json.loads(CALCULATOR.parameters_json_schema),
            },
        }
    ]

    result = '{"expression": "12*(3+4)", "result": 84}'
    second = await collect(
        running.stub, request(QUESTION, calling(call), tool_result(call, result), tools=[CALCULATOR])
    )

    assert second.text == "12*(3+4) is 84."
    assert second.finished.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert fake_openai.requests[1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": CALCULATION}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]


async def test_parallel_tool_calls_come_complete_and_in_order(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    calls = [FakeToolCall("calculator", '{"expression": "1+1"}', "a", 5), FakeToolCall("current_time", "{}", "b", 1)]
    fake_openai.script(FakeReply(chunks=[], tool_calls=calls, finish_reason="stop"))

    reply = await collect(running.stub, request(QUESTION, tools=[CALCULATOR]))

    assert [(call.id, call.name, call.arguments_json) for call in reply.tool_calls] == [
        ("a", "calculator", '{"expression": "1+1"}'),
        ("b", "current_time", "{}"),
    ]
    # Some servers say "stop" after tool calls; the stream still ends with TOOL_CALLS.
    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS


async def test_a_model_without_tool_support_gets_no_tools(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai, supports_tools=False)]))

    await collect(running.stub, request(QUESTION, tools=[CALCULATOR]))

    assert "tools" not in fake_openai.requests[0].body


@pytest.mark.parametrize("parameter", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_is_sent_under_the_configured_name(start_llm, fake_openai: FakeOpenAI, parameter: str):
    running = await start_llm(openai_settings([fake_model(fake_openai, max_tokens_parameter=parameter)]))
    fake_openai.script(FakeReply(chunks=["Hel", "lo"], finish_reason="length"))

    reply = await collect(running.stub, request(user("Hi"), max_tokens=2))

    assert fake_openai.requests[0].body[parameter] == 2
    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_LENGTH


async def test_a_stream_that_ends_without_finishing_is_unavailable(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))
    fake_openai.script(FakeReply(chunks=["Hel", "lo"], finish_reason=""))

    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in running.stub.Generate(request(user("Hi")), timeout=5):
            received.append(response.WhichOneof("kind"))

    assert received == ["started", "chunk", "chunk"]
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped before finishing" in failure.value.details()


async def test_embed_goes_through_the_sdk(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)]))

    reply = await running.stub.Embed(llm_pb2.EmbedRequest(model="fake-gpt", inputs=["one", "two three"]), timeout=5)

    assert reply.model == "fake-gpt"
    assert [list(embedding.values) for embedding in reply.embeddings] == [
        pytest.approx(fake_embedding("one")),
        pytest.approx(fake_embedding("two three")),
    ]
    assert reply.prompt_tokens == 3
    [sent] = fake_openai.requests
    assert (sent.path, sent.body["model"], sent.body["input"]) == (
        "/v1/embeddings",
        "upstream-fake-gpt",
        ["one", "two three"],
    )


ERROR_TABLE = [
    pytest.param(
        FakeReply.error(400, "Invalid value for 'tools'"), grpc.StatusCode.INVALID_ARGUMENT, "Invalid value", id="400"
    ),
    pytest.param(
        FakeReply.error(404, "The model does not exist"), grpc.StatusCode.INVALID_ARGUMENT, "does not exist", id="404"
    ),
    pytest.param(FakeReply.error(422, "Unprocessable"), grpc.StatusCode.INVALID_ARGUMENT, "(422)", id="422"),
    pytest.param(
        FakeReply.error(401, "Incorrect API key"), grpc.StatusCode.FAILED_PRECONDITION, "credentials", id="401"
    ),
    pytest.param(FakeReply.error(403, "Forbidden"), grpc.StatusCode.FAILED_PRECONDITION, "credentials (403)", id="403"),
    pytest.param(FakeReply.error(429), grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited", id="429"),
    pytest.param(
        FakeReply.error(429, code="insufficient_quota"), grpc.StatusCode.FAILED_PRECONDITION, "no quota", id="429 quota"
    ),
    pytest.param(FakeReply.error(500), grpc.StatusCode.UNAVAILABLE, "answered 500", id="500"),
    pytest.param(FakeReply.error(503), grpc.StatusCode.UNAVAILABLE, "answered 503", id="503"),
    pytest.param(FakeReply(stall_before_headers=True), grpc.StatusCode.UNAVAILABLE, "timed out", id="upstream timeout"),
    pytest.param(FakeReply(drop_after=0), grpc.StatusCode.UNAVAILABLE, "", id="dropped before the first token"),
    pytest.param(FakeReply(stall_after=1), grpc.StatusCode.UNAVAILABLE, "timed out", id="stalled mid-stream"),
    pytest.param(FakeReply(drop_after=1), grpc.StatusCode.UNAVAILABLE, "connection to its provider failed",
                 id="dropped mid-stream"),
]


@pytest.mark.parametrize(("reply", "code", "detail"), ERROR_TABLE)
async def test_upstream_failures_map_to_status_codes(start_llm, fake_openai: FakeOpenAI, reply, code, detail):
    settings = openai_settings([fake_model(fake_openai)], llm_retry_max_attempts=1, llm_upstream_timeout_seconds=0.3)
    running = await start_llm(settings)
    fake_openai.script(reply)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(running.stub, request(user("Hi")))

    assert failure.value.code() == code
    assert "fake-gpt" in failure.value.details()
    assert detail in failure.value.details()


async def test_an_unreachable_upstream_is_unavailable(start_llm, fake_openai: FakeOpenAI):
    await fake_openai.close()  # nothing listens on its port any more
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_retry_max_attempts=1))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(running.stub, request(user("Hi")))

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "model 'fake-gpt' is unavailable: the connection to its provider failed"


async def test_a_rate_limited_embed_carries_retry_after(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(openai_settings([fake_model(fake_openai)], llm_retry_max_attempts=1))
    fake_openai.script(FakeReply.error(429, headers={"Retry-After": "7"}))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await running.stub.Embed(llm_pb2.EmbedRequest(model="fake-gpt", inputs=["x"]), timeout=5)

    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_AFTER_KEY, "7000") in tuple(failure.value.trailing_metadata())
