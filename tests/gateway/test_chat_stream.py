"""The bidi Chat stream end to end through real services: streaming, multi-turn, cancel, half-close."""

import asyncio
import time

import grpc
from chat_helpers import ChatStream, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2


async def stored_messages(system, conversation_id: str) -> list[history_pb2.Message]:
    reply = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=conversation_id)
    )
    return list(reply.messages)


async def test_answer_streams_token_by_token_then_completes_with_usage(make_system):
    system = await make_system(tokens_per_second=50)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    assert opened.session_opened.resumed is False
    assert opened.session_opened.conversation_id

    await chat.say("hello there")
    events = await chat.until_turn_ends()

    assert kinds(events)[:2] == ["message_accepted", "turn_started"]
    assert kinds(events)[-1] == "turn_completed"
    deltas = [e for e in events if e.WhichOneof("kind") == "delta"]
    assert len(deltas) >= 40
    # Incremental: at 50 tokens/s the deltas arrive spread over time, not in one burst at the end.
    delta_times = chat.received_at[-len(events) + 2 : -1]
    assert delta_times[-1] - delta_times[0] > 0.5
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert all(e.turn_id == events[0].turn_id for e in events)

    completed = events[-1].turn_completed
    assert completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert completed.usage.completion_tokens == len(deltas)
    assert completed.usage.prompt_tokens > 0
    assert completed.time_to_first_token.ToNanoseconds() > 0
    assert 10 < completed.tokens_per_second < 200

    stored = await stored_messages(system, opened.session_opened.conversation_id)
    assert [m.role for m in stored] == [history_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT]
    assert stored[1].content == text_of(events)
    assert stored[1].message_id == completed.assistant_message_id
    assert stored[1].status == history_pb2.MESSAGE_STATUS_COMPLETE
    chat.cancel()


async def test_second_turn_sees_the_conversation_so_far(system):
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("my favourite colour is teal")
    first = await chat.until_turn_ends()
    assert kinds(first)[-1] == "turn_completed"

    await chat.say("what did I tell you first?")
    second = await chat.until_turn_ends()
    assert kinds(second)[-1] == "turn_completed", second[-1]
    assert second[0].seq == first[-1].seq + 1
    # The demo model recalls the first user message, so the context reached the model.
    assert "teal" in text_of(second)
    assert text_of(second) != text_of(first)
    chat.cancel()


async def test_continuing_a_conversation_in_a_new_session_keeps_its_history(system):
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("remember the word pelican")
    await chat.until_turn_ends()
    chat.cancel()

    again = ChatStream(system.chat)
    reopened = await again.open(conversation_id=opened.session_opened.conversation_id)
    assert reopened.session_opened.session_id != opened.session_opened.session_id
    await again.say("and now?")
    assert "pelican" in text_of(await again.until_turn_ends())
    again.cancel()


async def test_cancel_mid_turn_ends_promptly_and_stores_the_partial_answer(make_system):
    system = await make_system(tokens_per_second=20)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("tell me a long story")
    events = await chat.until("delta")
    events += [await chat.next_event(), await chat.next_event()]
    turn_id = events[0].turn_id

    cancelled_at = time.monotonic()
    await chat.send(cancel=chat_pb2.Cancel(turn_id=turn_id))
    events += await chat.until_turn_ends()
    assert time.monotonic() - cancelled_at < 1.0
    assert kinds(events)[-1] == "turn_cancelled"
    cancelled = events[-1].turn_cancelled
    partial = text_of(events)
    assert cancelled.usage.completion_tokens == len([e for e in events if e.WhichOneof("kind") == "delta"])
    assert cancelled.usage.completion_tokens < 40

    stored = await stored_messages(system, opened.session_opened.conversation_id)
    assert stored[-1].status == history_pb2.MESSAGE_STATUS_CANCELLED
    assert stored[-1].content == partial
    assert stored[-1].message_id == cancelled.assistant_message_id

    # The session goes on: the next message gets a full answer.
    await chat.say("never mind")
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    chat.cancel()


async def test_half_closed_stream_still_receives_the_whole_turn_then_ends(system):
    chat = ChatStream(system.chat)
    await chat.send(open=chat_pb2.OpenSession())
    await chat.say("hi")
    await chat.half_close()
    events = [response.event async for response in chat.call]
    assert kinds(events)[0] == "session_opened"
    assert kinds(events)[-1] == "turn_completed"
    assert await chat.call.code() == grpc.StatusCode.OK


async def test_ping_gets_a_pong_that_is_not_logged(system):
    chat = ChatStream(system.chat)
    await chat.send(ping=chat_pb2.Ping(nonce="n1"))
    pong = await chat.next_event()
    assert pong.pong.nonce == "n1"
    assert pong.seq == 0
    chat.cancel()


async def test_a_second_message_while_a_turn_runs_is_refused_and_the_turn_goes_on(make_system):
    system = await make_system(tokens_per_second=30)
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("first")
    await chat.until("delta")
    await chat.say("second")
    events = await chat.until_turn_ends()
    errors = [e for e in events if e.WhichOneof("kind") == "error"]
    assert len(errors) == 1
    assert errors[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert errors[0].seq == 0
    assert kinds(events)[-1] == "turn_completed"
    chat.cancel()


async def test_many_concurrent_sessions_each_get_their_own_answer(system):
    async def one(n: int) -> str:
        chat = ChatStream(system.chat)
        await chat.open()
        await chat.say(f"number {n}")
        events = await chat.until_turn_ends(timeout=30)
        chat.cancel()
        assert kinds(events)[-1] == "turn_completed"
        return text_of(events)

    answers = await asyncio.gather(*(one(n) for n in range(20)))
    for n, answer in enumerate(answers):
        assert f"number {n}" in answer
