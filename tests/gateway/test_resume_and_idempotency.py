"""A dropped connection does not cancel a turn; resume delivers every missed event exactly once;
the same client message id is stored once and answered once."""

import asyncio

import grpc
from chat_helpers import ChatStream, collect, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2


def assert_contiguous(events) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def start_turn_and_drop(system, deltas_before_drop: int = 3):
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("a message whose answer outlives the connection")
    seen = await chat.until("delta")
    while len([e for e in seen if e.WhichOneof("kind") == "delta"]) < deltas_before_drop:
        seen.append(await chat.next_event())
    chat.cancel()  # the client vanishes mid-answer
    return opened.session_opened, seen


async def test_resume_stream_delivers_the_rest_of_a_running_turn_exactly_once(make_system):
    system = await make_system(tokens_per_second=30)
    session, seen = await start_turn_and_drop(system)

    await asyncio.sleep(0.3)  # the turn keeps going while nobody listens
    call = system.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=session.session_id, after_seq=seen[-1].seq)
    )
    rest = await collect(call)
    assert rest[0].seq == seen[-1].seq + 1
    assert_contiguous(seen + rest)
    assert kinds(rest)[-1] == "turn_completed"

    stored = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=session.conversation_id)
    )
    assert stored.messages[-1].content == text_of(seen) + text_of(rest)
    assert stored.messages[-1].status == history_pb2.MESSAGE_STATUS_COMPLETE


async def test_reopening_with_resume_after_seq_replays_then_follows_live(make_system):
    system = await make_system(tokens_per_second=30)
    session, seen = await start_turn_and_drop(system)

    chat = ChatStream(system.chat)
    reopened = await chat.open(session_id=session.session_id, resume_after_seq=seen[-1].seq)
    assert reopened.session_opened.resumed is True
    rest = await chat.until_turn_ends()
    assert rest[0].seq == seen[-1].seq + 1
    assert_contiguous(seen + rest)
    assert kinds(rest)[-1] == "turn_completed"

    # Still attached: the next turn streams on the same connection.
    await chat.say("and another")
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    chat.cancel()


async def test_resume_after_everything_ended_replays_from_the_session_log(system):
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("one")
    first = await chat.until_turn_ends()
    await chat.say("two")
    second = await chat.until_turn_ends()
    chat.cancel()
    await asyncio.sleep(0.1)  # the gateway forgets the idle session; the session service has the log

    call = system.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=opened.session_opened.session_id, after_seq=0)
    )
    replayed = await collect(call)
    assert [e.SerializeToString() for e in replayed] == [e.SerializeToString() for e in first + second]

    call = system.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=opened.session_opened.session_id, after_seq=first[-1].seq)
    )
    assert [e.seq for e in await collect(call)] == [e.seq for e in second]


async def test_same_client_message_id_is_stored_once_and_answered_once(system):
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("only once please", client_message_id="client-42")
    first = await chat.until_turn_ends()
    assert kinds(first)[-1] == "turn_completed"

    await chat.say("only once please", client_message_id="client-42")
    duplicate = await chat.next_event()
    assert duplicate.message_accepted.duplicate is True
    assert duplicate.message_accepted.message_id == first[0].message_accepted.message_id
    assert duplicate.seq == 0

    await chat.send(ping=chat_pb2.Ping(nonce="after"))
    assert (await chat.next_event()).WhichOneof("kind") == "pong"  # no second answer came first

    stored = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=opened.session_opened.conversation_id)
    )
    assert [m.role for m in stored.messages] == [history_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT]
    chat.cancel()


async def test_a_duplicate_message_uses_no_quota(make_system):
    system = await make_system(session_overrides={"quota_messages_per_minute": 2})
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("only once please", client_message_id="client-42")
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    for _ in range(3):  # a client retrying what it already sent
        await chat.say("only once please", client_message_id="client-42")
        assert (await chat.next_event()).message_accepted.duplicate

    await chat.say("a second message")  # the second of two a minute: still allowed
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    await chat.say("a third message")
    refused = await chat.next_event()
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], refused
    chat.cancel()


async def test_resending_the_running_message_after_a_reconnect_is_a_duplicate(make_system):
    system = await make_system(tokens_per_second=30)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("slow answer", client_message_id="resend-me")
    await chat.until("delta")
    chat.cancel()

    again = ChatStream(system.chat)
    await again.open(session_id=opened.session_opened.session_id)
    await again.say("slow answer", client_message_id="resend-me")
    events = await again.until_turn_ends()
    accepted = [e for e in events if e.WhichOneof("kind") == "message_accepted"]
    assert [a.message_accepted.duplicate for a in accepted] == [True]
    assert kinds(events)[-1] == "turn_completed"
    again.cancel()


async def test_send_message_streams_one_turn_and_is_idempotent(system):
    request = chat_pb2.SendMessageRequest(
        message=chat_pb2.UserMessage(client_message_id="one-shot", text="hello from grpc-web")
    )
    events = await collect(system.chat.SendMessage(request))
    assert kinds(events)[:3] == ["session_opened", "message_accepted", "turn_started"]
    assert kinds(events)[-1] == "turn_completed"
    session_id = events[0].session_opened.session_id

    request.session_id = session_id
    again = await collect(system.chat.SendMessage(request))
    assert kinds(again) == ["session_opened", "message_accepted"]
    assert again[0].session_opened.resumed is True
    assert again[1].message_accepted.duplicate is True


async def test_cancel_turn_rpc_stops_a_send_message_turn(make_system):
    system = await make_system(tokens_per_second=20)
    request = chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(text="go on and on"))
    call = system.chat.SendMessage(request)
    opened = (await call.read()).event
    events = []
    while "delta" not in kinds(events):
        events.append((await call.read()).event)

    reply = await system.chat.CancelTurn(
        chat_pb2.CancelTurnRequest(session_id=opened.session_opened.session_id, turn_id=events[0].turn_id)
    )
    assert reply.cancelled is True
    events += await collect(call)
    assert kinds(events)[-1] == "turn_cancelled"

    again = await system.chat.CancelTurn(chat_pb2.CancelTurnRequest(session_id=opened.session_opened.session_id))
    assert again.cancelled is False  # nothing runs any more


async def test_events_reach_the_session_log_while_the_turn_still_runs(make_system):
    from duplex.session.v1 import session_pb2

    system = await make_system(tokens_per_second=20)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("log me as you go")
    seen = await chat.until("delta")
    for _ in range(5):
        seen.append(await chat.next_event())
    await asyncio.sleep(0.2)  # several flush intervals
    log = system.session_store.ReadEvents(
        session_pb2.ReadEventsRequest(user_id="local", session_id=opened.session_opened.session_id)
    )
    logged = [e.seq async for batch in log for e in batch.events]
    assert logged[: len(seen)] == [e.seq for e in seen]  # batched in while the answer streams
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    chat.cancel()
