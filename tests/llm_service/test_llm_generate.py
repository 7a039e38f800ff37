"""Generate against the real server and the built-in demo model."""

import asyncio
import json
import re
import time

import grpc
import pytest
from llm_helpers import (
    BUILTIN_TOOLS,
    CALCULATOR,
    RunningLlm,
    assistant,
    calling,
    collect,
    make_settings,
    request,
    system,
    tool,
    tool_result,
    user,
)

from duplex.llm.v1 import llm_pb2
from llm_service.providers import LocalProvider
from llm_service.servicer import MAX_PROMPT_CHARS

CONVERSATION = (
    system("You are a helpful assistant."),
    user("What is the capital of France?"),
    assistant("Paris."),
    user("And the capital of Spain?"),
    assistant("Madrid."),
    user("Thanks! Which one is bigger?"),
)


async def test_stream_is_started_then_chunks_then_finished_with_matching_usage(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("one two three"), assistant("four five")))

    assert reply.kinds[0] == "started"
    assert reply.kinds[-1] == "finished"
    assert set(reply.kinds[1:-1]) == {"chunk"}
    assert len(reply.chunks) >= 40
    assert reply.started.model == "local-demo"
    # The demo estimates prompt tokens as words: 3 + 2.
    assert reply.started.prompt_tokens == reply.finished.prompt_tokens == 5
    assert reply.finished.completion_tokens == sum(chunk.token_count for chunk in reply.chunks)
    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_STOP


async def test_each_chunk_is_one_word_with_its_following_whitespace(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("hello   there\nfriend")))

    assert all(chunk.token_count == 1 for chunk in reply.chunks)
    assert all(re.fullmatch(r"\S+\s*", chunk.text) for chunk in reply.chunks)
    assert len(reply.text.split()) == len(reply.chunks)


async def test_the_reply_says_it_comes_from_the_demo_model(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("Hi")))

    assert "Duplex's built-in demo model" in reply.text
    assert "not a language model" in reply.text


async def test_the_same_conversation_gets_the_same_reply_byte_for_byte(start_llm):
    first_server = await start_llm()
    second_server = await start_llm()

    first = await collect(first_server.stub, request(*CONVERSATION))
    again = await collect(first_server.stub, request(*CONVERSATION))
    elsewhere = await collect(second_server.stub, request(*CONVERSATION))

    # Everything but the moment each chunk was produced.
    assert without_times(first) == without_times(again) == without_times(elsewhere)


def without_times(reply) -> list[llm_pb2.GenerateResponse]:
    responses = [llm_pb2.GenerateResponse.FromString(response.SerializeToString()) for response in reply.responses]
    for response in responses:
        if response.HasField("chunk"):
            response.chunk.ClearField("produced_at")
    return responses


async def test_every_chunk_says_when_it_was_produced(llm: RunningLlm):
    before = time.time_ns()
    reply = await collect(llm.stub, request(user("Hi")))

    produced = [chunk.produced_at.ToNanoseconds() for chunk in reply.chunks]
    assert all(chunk.HasField("produced_at") for chunk in reply.chunks)
    assert before <= produced[0] <= produced[-1] <= time.time_ns()
    assert produced == sorted(produced)


async def test_the_reply_quotes_the_latest_user_message_counts_them_and_recalls_the_first(llm: RunningLlm):
    reply = await collect(llm.stub, request(*CONVERSATION))

    assert '"Thanks! Which one is bigger?"' in reply.text
    assert "You have sent 3 messages in this conversation." in reply.text
    assert '"What is the capital of France?"' in reply.text
    assert "And the capital of Spain?" not in reply.text
    assert "instructions" in reply.text


async def test_a_first_message_is_called_the_first(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("What is the capital of France?")))

    assert '"What is the capital of France?"' in reply.text
    assert "first message you have sent" in reply.text


async def test_a_different_conversation_gets_a_different_reply(llm: RunningLlm):
    one = await collect(llm.stub, request(user("Tell me about cats.")))
    other = await collect(llm.stub, request(user("Tell me about dogs.")))

    assert one.text != other.text


async def test_long_messages_are_quoted_truncated(llm: RunningLlm):
    long_message = " ".join(f"word{i}" for i in range(200))

    reply = await collect(llm.stub, request(user(long_message)))

    assert '"word0 word1 word2' in reply.text
    assert "word199" not in reply.text
    assert '..."' in reply.text


async def test_the_reply_is_padded_to_the_configured_minimum(start_llm):
    running = await start_llm(make_settings(local_min_reply_tokens=300))

    reply = await collect(running.stub, request(user("Hi")))

    assert len(reply.chunks) >= 300
    assert reply.finished.completion_tokens == len(reply.chunks)


async def test_chunks_can_carry_several_tokens_and_still_spell_the_same_reply(start_llm, llm: RunningLlm):
    coalescing = await start_llm(make_settings(local_tokens_per_chunk=4))

    one_per_chunk = await collect(llm.stub, request(*CONVERSATION))
    four_per_chunk = await collect(coalescing.stub, request(*CONVERSATION))

    assert four_per_chunk.text == one_per_chunk.text
    assert all(chunk.token_count == 4 for chunk in four_per_chunk.chunks[:-1])
    assert four_per_chunk.finished.completion_tokens == one_per_chunk.finished.completion_tokens


async def test_the_stream_is_paced_at_the_configured_rate(start_llm):
    rate = 200.0
    running = await start_llm(make_settings(local_tokens_per_second=rate))

    began = time.monotonic()
    reply = await collect(running.stub, request(user("Hi")))
    elapsed = time.monotonic() - began

    # A lower bound only: a busy machine may be slower, never faster.
    assert elapsed >= 0.95 * reply.finished.completion_tokens / rate


async def test_max_tokens_caps_the_reply_with_finish_reason_length(llm: RunningLlm):
    full = await collect(llm.stub, request(*CONVERSATION))
    capped = await collect(llm.stub, request(*CONVERSATION, max_tokens=5))

    assert len(capped.chunks) == 5
    assert capped.finished.completion_tokens == 5
    assert capped.finished.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert full.text.startswith(capped.text)


async def test_max_tokens_above_the_reply_length_finishes_with_stop(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("Hi"), max_tokens=10_000))

    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("model", ["", "local-demo"])
async def test_the_default_or_named_model_answers(llm: RunningLlm, model: str):
    reply = await collect(llm.stub, request(user("Hi"), model=model))

    assert reply.started.model == "local-demo"


async def test_an_unknown_model_is_not_found(llm: RunningLlm):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(llm.stub, request(user("Hi"), model="gpt-nope"))

    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert failure.value.details() == "model 'gpt-nope' not found"


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param((), id="no messages"),
        pytest.param((user("Hi"), llm_pb2.Message(content="who am I?")), id="unspecified role"),
        pytest.param((user("x" * (MAX_PROMPT_CHARS // 2)), user("x" * (MAX_PROMPT_CHARS // 2 + 1))), id="too long"),
    ],
)
async def test_invalid_requests_are_invalid_arguments(llm: RunningLlm, messages):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(llm.stub, request(*messages))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_prompt_of_exactly_the_limit_is_accepted(llm: RunningLlm):
    reply = await collect(llm.stub, request(user("x" * MAX_PROMPT_CHARS)))

    assert reply.kinds[-1] == "finished"


@pytest.mark.parametrize(
    ("tokens_per_second", "coalesce_window_ms"),
    [
        pytest.param(100.0, 0, id="paced"),
        pytest.param(100.0, 15, id="paced, coalescing"),
        # Coalesced, an unpaced reply this long would leave in a few big messages before the cancel.
        pytest.param(0.0, 0, id="unpaced, client not reading"),
    ],
)
async def test_cancelling_the_call_stops_the_provider_promptly(
    start_llm, tokens_per_second: float, coalesce_window_ms: float
):
    # A reply far longer than the test, so only the cancel can end it; unpaced, the server soon blocks
    # on flow control because the client stops reading.
    provider = LocalProvider(tokens_per_second=tokens_per_second, min_reply_tokens=50_000)
    running = await start_llm(make_settings(llm_coalesce_window_ms=coalesce_window_ms), providers=[provider])
    call = running.stub.Generate(request(user("Hi")))
    for _ in range(4):
        await call.read()
    await asyncio.sleep(0.2)
    assert provider.active_generations == 1

    call.cancel()
    for _ in range(100):  # up to one second
        if provider.active_generations == 0:
            break
        await asyncio.sleep(0.01)

    assert provider.active_generations == 0
    # The server is unharmed and answers the next call.
    assert (await collect(running.stub, request(user("Hi"), max_tokens=3))).kinds[-1] == "finished"


# --- tools and embeddings with the demo model ----------------------------------------------------------


async def test_the_demo_runs_a_two_round_tool_call(llm: RunningLlm):
    question = user("what is 12*(3+4)?")

    first = await collect(llm.stub, request(question, tools=BUILTIN_TOOLS))

    assert first.kinds == ["started", "tool_call", "finished"]
    assert first.finished.finish_reason == llm_pb2.FINISH_REASON_TOOL_CALLS
    [call] = first.tool_calls
    assert (call.name, json.loads(call.arguments_json)) == ("calculator", {"expression": "12*(3+4)"})

    result = tool_result(call, '{"expression": "12*(3+4)", "result": 84}')
    second = await collect(llm.stub, request(question, calling(call), result, tools=BUILTIN_TOOLS))

    assert second.text.startswith("The calculator says 12*(3+4) = 84.")
    assert second.finished.finish_reason == llm_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize(
    ("tools", "detail"),
    [
        pytest.param([tool("calculator", "{not json")], "not valid JSON", id="bad schema"),
        pytest.param([tool("calculator", "[1, 2]")], "must be a JSON object", id="schema not an object"),
        pytest.param([tool("no spaces allowed")], "tools[0].name", id="bad name"),
        pytest.param([tool("")], "tools[0].name", id="no name"),
        pytest.param([CALCULATOR, CALCULATOR], "unique", id="twice the same tool"),
    ],
)
async def test_invalid_tools_are_invalid_arguments(llm: RunningLlm, tools, detail: str):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(llm.stub, request(user("Hi"), tools=tools))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.value.details()


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        pytest.param(llm_pb2.Message(role=llm_pb2.ROLE_TOOL, content="{}"), "without a tool_call_id", id="no call id"),
        pytest.param(
            llm_pb2.Message(role=llm_pb2.ROLE_USER, tool_calls=[llm_pb2.ToolCall(id="1", name="x")]),
            "only assistant messages",
            id="user with tool calls",
        ),
        pytest.param(calling(llm_pb2.ToolCall(id="1")), "needs an id and a name", id="call without a name"),
    ],
)
async def test_malformed_tool_messages_are_invalid_arguments(llm: RunningLlm, message, detail: str):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(llm.stub, request(user("Hi"), message))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.value.details()


async def test_a_summarize_system_prompt_gets_a_summary(llm: RunningLlm):
    reply = await collect(llm.stub, request(system("Summarize this conversation."), user("Plan a trip")))

    assert reply.text == 'Summary: 1 user message: "Plan a trip".'


@pytest.mark.parametrize("model", ["", "local-demo"])
async def test_embed_with_the_demo_model(llm: RunningLlm, model: str):
    reply = await llm.stub.Embed(llm_pb2.EmbedRequest(model=model, inputs=["a cat", "a dog", "a cat"]), timeout=5)

    assert reply.model == "local-demo"
    assert [len(embedding.values) for embedding in reply.embeddings] == [64, 64, 64]
    assert reply.embeddings[0].values == reply.embeddings[2].values != reply.embeddings[1].values
    assert reply.prompt_tokens == 6


@pytest.mark.parametrize(
    ("inputs", "detail"),
    [([], "must not be empty"), (["ok", "  "], "inputs[1] is empty"), (["x"] * 2049, "limit is 2048")],
    ids=["no inputs", "a blank input", "too many"],
)
async def test_invalid_embed_requests_are_invalid_arguments(llm: RunningLlm, inputs, detail: str):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await llm.stub.Embed(llm_pb2.EmbedRequest(inputs=inputs), timeout=5)

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.value.details()


async def test_embed_with_an_unknown_model_is_not_found(llm: RunningLlm):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await llm.stub.Embed(llm_pb2.EmbedRequest(model="nope", inputs=["x"]), timeout=5)

    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
