"""Real-model behaviour through the whole system: the real openai SDK in llm_service against a fake
OpenAI-compatible server, and the tool loop run by the gateway."""

import json
import time

import grpc
from chat_helpers import ChatStream, kinds, text_of

from duplex.history.v1 import history_pb2
from tests.fake_openai import FakeOpenAI, FakeReply, FakeToolCall


def catalogue(fake: FakeOpenAI) -> dict:
    return {"llm_models": [{"name": "fake-gpt", "base_url": fake.base_url}], "llm_retry_base_delay_seconds": 0.01}


async def stored(system, conversation_id: str) -> list[history_pb2.Message]:
    reply = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=conversation_id)
    )
    return list(reply.messages)


async def test_an_openai_compatible_model_streams_through_the_whole_system(make_system):
    async with FakeOpenAI() as fake:
        system = await make_system(llm_overrides=catalogue(fake))
        fake.script(FakeReply(chunks=["Hello", " from", " a", " real", " SDK."], pace=0.05, usage=(21, 5)))
        chat = ChatStream(system.chat)
        await chat.open(model="fake-gpt")
        await chat.say("hi")
        events = await chat.until_turn_ends()
        assert kinds(events)[-1] == "turn_completed"
        assert text_of(events) == "Hello from a real SDK."
        assert events[-1].turn_completed.usage.prompt_tokens == 21
        assert events[-1].turn_completed.usage.completion_tokens == 5
        [request] = fake.requests
        assert request.body["messages"][-1] == {"role": "user", "content": "hi"}
        chat.cancel()


async def test_a_two_round_tool_call_runs_the_tool_and_feeds_the_result_back(make_system):
    async with FakeOpenAI() as fake:
        system = await make_system(llm_overrides=catalogue(fake))
        fake.script(
            FakeReply(chunks=[], tool_calls=[FakeToolCall("calculator", '{"expression": "6*7"}', id="call-1")]),
            FakeReply(chunks=["It is", " 42."]),
        )
        chat = ChatStream(system.chat)
        opened = await chat.open(model="fake-gpt")
        await chat.say("what is six times seven?")
        events = await chat.until_turn_ends()
        assert [k for k in kinds(events) if k in ("tool_call", "tool_result", "turn_completed")] == [
            "tool_call", "tool_result", "turn_completed"]
        result = next(e.tool_result for e in events if e.WhichOneof("kind") == "tool_result")
        assert json.loads(result.result_json)["result"] == 42 and not result.is_error
        second = fake.requests[1].body["messages"]
        assert second[-1]["role"] == "tool" and json.loads(second[-1]["content"])["result"] == 42
        assert second[-2]["tool_calls"][0]["id"] == "call-1"
        roles = [m.role for m in await stored(system, opened.session_opened.conversation_id)]
        assert roles == [history_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT, history_pb2.ROLE_TOOL,
                         history_pb2.ROLE_ASSISTANT]
        chat.cancel()


async def test_a_failure_mid_stream_is_a_retryable_error_and_the_partial_text_is_kept(make_system):
    async with FakeOpenAI() as fake:
        system = await make_system(llm_overrides=catalogue(fake))
        fake.script(FakeReply(chunks=["Part", " one", " and", " more"], drop_after=2, pace=0.02))
        chat = ChatStream(system.chat)
        opened = await chat.open(model="fake-gpt")
        await chat.say("go")
        events = await chat.until_turn_ends()
        end = events[-1]
        assert end.WhichOneof("kind") == "error" and end.error.retryable
        assert end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        answer = (await stored(system, opened.session_opened.conversation_id))[-1]
        assert answer.status == history_pb2.MESSAGE_STATUS_ERROR and answer.content == "Part one"
        chat.cancel()


async def test_cancel_closes_the_upstream_request_within_500_ms(make_system):
    async with FakeOpenAI() as fake:
        system = await make_system(llm_overrides=catalogue(fake))
        fake.script(FakeReply(chunks=[f" word{n}" for n in range(200)], pace=0.05))
        chat = ChatStream(system.chat)
        await chat.open(model="fake-gpt")
        await chat.say("talk for a long time")
        await chat.until("delta")
        cancelled_at = time.monotonic()  # the fake server's clock
        await chat.send(cancel={})
        events = await chat.until_turn_ends()
        assert kinds(events)[-1] == "turn_cancelled"
        [disconnected_at] = await fake.wait_for_disconnects(1, timeout=2)
        assert disconnected_at - cancelled_at < 0.5
        chat.cancel()


async def test_the_demo_model_asks_for_the_calculator_and_answers_with_its_result(system):
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("what is 12*(3+4)?")
    events = await chat.until_turn_ends()
    call = next(e.tool_call for e in events if e.WhichOneof("kind") == "tool_call")
    assert call.name == "calculator"
    result = next(e.tool_result for e in events if e.WhichOneof("kind") == "tool_result")
    assert json.loads(result.result_json)["result"] == 84
    assert "84" in text_of(events)
    assert kinds(events)[-1] == "turn_completed"
    chat.cancel()
