"""Resume under load: 100 clients drop their connection mid-answer at once and resume; none loses or repeats
an event, and each one's text is the stored answer. One client message id sent on three streams of a
session at once is stored once and answered once. Memory stores, and Redis + PostgreSQL; half of the
resumes go through a second gateway, which reads the running turn from the session service's log."""

import asyncio
import statistics
import time
from dataclasses import dataclass

import grpc
import pytest

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2
from history_service.migrate import migrate
from history_service.settings import HistorySettings
from tests.faults.load_clients import (
    add_gateway,
    deltas,
    logged,
    start_system_on,
    stored_messages,
    text_of,
)
from tests.gateway.chat_helpers import ChatStream, is_turn_end
from tests.postgres_fixtures import postgres_databases, postgres_url  # noqa: F401 - fixtures
from tests.redis_fixtures import redis_key_prefix, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)

CLIENTS = 100
# ~50-token answers take ~5 s: every client drops and resumes while its turn is still answering.
TOKENS_PER_SECOND = 10
TRIALS = 10
READ_TIMEOUT_SECONDS = 30.0  # generous: 100 streams and four services share one event loop on 2 cores
DROPS = ("cancel the call", "close the channel")
RESUMES = ("ResumeStream", "reopen with resume_after_seq")
GATEWAYS = ("a", "b")  # the gateway running the turn, or the other one


@pytest.fixture(params=["memory", "redis+postgres"])
async def replicated(request, make_system, tmp_path):
    if request.param == "memory":
        system = await make_system(tokens_per_second=TOKENS_PER_SECOND)
        redis = {}
    else:
        redis = {name: request.getfixturevalue(name) for name in ("redis_url", "redis_key_prefix")}
        database = request.getfixturevalue("postgres_databases").create()
        await migrate(HistorySettings(database_url=database))
        system = await start_system_on(tmp_path / "data-pg", TOKENS_PER_SECOND, redis, database)
    running = await add_gateway(system, redis)
    try:
        yield running
    finally:
        await running.stop()
        if redis:
            await system.stop()


@dataclass
class Dropped:
    """What one client saw before its connection dropped, and after it resumed."""

    index: int
    session_id: str
    conversation_id: str
    seen: list[chat_pb2.ChatEvent]
    rest: list[chat_pb2.ChatEvent]
    resumed_at: float  # wall clock, as event times are
    first_resumed_after: float  # seconds from asking to resume to its first event

    @property
    def events(self) -> list[chat_pb2.ChatEvent]:
        return logged(self.seen) + logged(self.rest)

    def problems(self) -> tuple[int, int, list[str]]:
        """Events lost, events duplicated, and what else is wrong."""
        seqs = [event.seq for event in self.events]
        expected = set(range(1, max(seqs) + 1))
        lost = len(expected - set(seqs))
        duplicated = len(seqs) - len(set(seqs))
        wrong = []
        if seqs != sorted(seqs):
            wrong.append(f"out of order: {seqs}")
        if len({event.turn_id for event in self.events}) != 1:
            wrong.append("events of more than one turn")
        if not self.events or self.events[-1].WhichOneof("kind") != "turn_completed":
            wrong.append(f"ended with {self.events[-1] if self.events else 'nothing'}")
        return lost, duplicated, wrong


async def drop_mid_answer_and_resume(replicated, index: int) -> Dropped:
    drop = DROPS[index % 2]
    resume = RESUMES[index // 2 % 2]
    gateway = GATEWAYS[index // 4 % 2]
    channel = grpc.aio.insecure_channel(replicated.target("a"))
    chat = ChatStream(chat_pb2_grpc.ChatServiceStub(channel))
    await chat.send(open=chat_pb2.OpenSession())
    opened = (await chat.next_event(READ_TIMEOUT_SECONDS)).session_opened
    await chat.say(f"client {index}, please answer at length", client_message_id=f"client-{index}")
    seen = []
    while deltas(seen) < 1 + index % 5:  # drop after 1 to 5 deltas
        seen.append(await chat.next_event(READ_TIMEOUT_SECONDS))
    if drop == "cancel the call":
        chat.cancel()
    await channel.close()

    resumed_at, asked = time.time(), time.monotonic()
    after_seq = seen[-1].seq
    async with grpc.aio.insecure_channel(replicated.target(gateway)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        rest: list[chat_pb2.ChatEvent] = []
        first_at = None
        if resume == "ResumeStream":
            call = stub.ResumeStream(chat_pb2.ResumeStreamRequest(session_id=opened.session_id, after_seq=after_seq))
            async with asyncio.timeout(3 * READ_TIMEOUT_SECONDS):
                async for response in call:
                    first_at = first_at or time.monotonic()
                    rest.append(response.event)
        else:
            again = ChatStream(stub)
            await again.send(open=chat_pb2.OpenSession(session_id=opened.session_id, resume_after_seq=after_seq))
            reopened = await again.next_event(READ_TIMEOUT_SECONDS)
            assert reopened.session_opened.resumed, reopened
            while not rest or not is_turn_end(rest[-1]):
                rest.append(await again.next_event(READ_TIMEOUT_SECONDS))
                first_at = first_at or time.monotonic()
            again.cancel()
    return Dropped(index, opened.session_id, opened.conversation_id, seen, rest, resumed_at, first_at - asked)


async def test_a_hundred_clients_dropping_mid_answer_resume_without_losing_or_repeating_an_event(replicated):
    started = time.monotonic()
    clients = await asyncio.gather(*(drop_mid_answer_and_resume(replicated, i) for i in range(CLIENTS)))
    elapsed = time.monotonic() - started

    lost = duplicated = 0
    wrong: list[str] = []
    for client in clients:
        client_lost, client_duplicated, client_wrong = client.problems()
        lost += client_lost
        duplicated += client_duplicated
        wrong += [f"client {client.index}: {what}" for what in client_wrong]
    assert (lost, duplicated) == (0, 0), f"{lost} events lost, {duplicated} duplicated over {CLIENTS} clients"
    assert wrong == []

    # Resumed while the turn still ran: the live path (memory on gateway a, the session log on b) was taken.
    ended_before_resume = [c.index for c in clients if c.events[-1].time.ToMicroseconds() / 1e6 < c.resumed_at]
    assert ended_before_resume == [], "these turns had ended before their client resumed"

    mismatched = []
    for client in clients:
        stored = await stored_messages(replicated.target("a"), client.conversation_id)
        roles = [message.role for message in stored]
        answer = stored[-1]
        if (
            roles != [conversation_pb2.MESSAGE_ROLE_USER, conversation_pb2.MESSAGE_ROLE_ASSISTANT]
            or answer.status != conversation_pb2.MESSAGE_STATUS_COMPLETE
            or answer.content != text_of(client.events)
        ):
            mismatched.append((client.index, roles, answer.status, answer.content[:40], text_of(client.events)[:40]))
    assert mismatched == [], "the text a client assembled differs from the stored answer"

    events = sum(len(c.events) for c in clients)
    waits = {
        gateway: sorted(c.first_resumed_after * 1000 for c in clients if GATEWAYS[c.index // 4 % 2] == gateway)
        for gateway in GATEWAYS
    }
    print(
        f"\n[{replicated.backend}] {CLIENTS} clients dropped and resumed in {elapsed:.1f} s: {events} events, "
        f"0 lost, 0 duplicated; first event after resuming, p50/max ms: same gateway "
        f"{statistics.median(waits['a']):.0f}/{waits['a'][-1]:.0f}, other gateway "
        f"{statistics.median(waits['b']):.0f}/{waits['b'][-1]:.0f}"
    )


def is_reply(event: chat_pb2.ChatEvent) -> bool:
    """A seq 0 answer to one request: a duplicate's acknowledgement, or a refusal."""
    return event.seq == 0 and event.WhichOneof("kind") in ("message_accepted", "error")


async def one_message_on_three_streams(
    replicated, trial: int, gateways: str = "aaa", to_turn_end: bool = True
) -> tuple[list[list[chat_pb2.ChatEvent]], str]:
    """Three connections attached to one session (through `gateways`) each send the same message at the
    same moment. Each reads until the turn ends, or (not to_turn_end) until its reply or the turn's end:
    a stream attached on one replica does not see a turn another replica runs."""
    channels = [grpc.aio.insecure_channel(replicated.target(gateway)) for gateway in gateways]
    try:
        streams = [ChatStream(chat_pb2_grpc.ChatServiceStub(channel)) for channel in channels]
        await streams[0].send(open=chat_pb2.OpenSession())
        opened = (await streams[0].next_event(READ_TIMEOUT_SECONDS)).session_opened
        for stream in streams[1:]:
            await stream.send(open=chat_pb2.OpenSession(session_id=opened.session_id))
            assert (await stream.next_event(READ_TIMEOUT_SECONDS)).session_opened.resumed
        message = chat_pb2.UserMessage(client_message_id=f"same-{trial}", text=f"trial {trial}: only once please")
        for stream in streams:  # queued together: each connection's reader takes it in the same instant
            await stream.send(message=message)

        async def read(stream: ChatStream) -> list[chat_pb2.ChatEvent]:
            events = []
            while not events or not (is_turn_end(events[-1]) or (not to_turn_end and is_reply(events[-1]))):
                events.append(await stream.next_event(READ_TIMEOUT_SECONDS))
            return events

        seen = await asyncio.gather(*(read(stream) for stream in streams))
        for stream in streams:
            stream.cancel()
        return seen, opened.conversation_id
    finally:
        for channel in channels:
            await channel.close()


async def assert_stored_once(replicated, trial: int, conversation_id: str, turn: list[chat_pb2.ChatEvent]) -> str:
    """The one turn answered the message, stored once with its answer; returns the stored message's id."""
    accepted = [event for event in turn if event.WhichOneof("kind") == "message_accepted"]
    assert len(accepted) == 1 and not accepted[0].message_accepted.duplicate, (trial, accepted)
    assert [event.WhichOneof("kind") for event in turn].count("turn_started") == 1, trial
    assert turn[-1].WhichOneof("kind") == "turn_completed", (trial, turn[-1])
    assert len({event.turn_id for event in turn}) == 1
    stored = await stored_messages(replicated.target("a"), conversation_id)
    assert [m.role for m in stored] == [conversation_pb2.MESSAGE_ROLE_USER, conversation_pb2.MESSAGE_ROLE_ASSISTANT]
    assert stored[0].client_message_id == f"same-{trial}"
    assert stored[0].message_id == accepted[0].message_accepted.message_id
    assert stored[1].content == text_of(turn)
    return stored[0].message_id


def assert_acknowledged(acknowledgements: list[tuple[int, chat_pb2.ChatEvent, str]]) -> None:
    """Each resend is acknowledged as a duplicate naming the stored message (MessageAccepted.message_id),
    as a resend after the turn does."""
    wrong = [
        (trial, reply.WhichOneof("kind"), reply.message_accepted.message_id or reply.error.message)
        for trial, reply, stored_id in acknowledgements
        if not (reply.message_accepted.duplicate and reply.message_accepted.message_id == stored_id)
    ]
    assert wrong == [], (
        f"{len(wrong)} of {len(acknowledgements)} resends were not acknowledged as duplicates of the stored "
        f"message (trial, reply, message_id or error): {wrong}"
    )


async def test_one_client_message_id_sent_on_three_streams_at_once_is_stored_once_and_answered_once(replicated):
    trials = await asyncio.gather(*(one_message_on_three_streams(replicated, t) for t in range(TRIALS)))
    acknowledgements = []
    for trial, (seen, conversation_id) in enumerate(trials):
        # One answer: every stream follows the session, so all three saw the same single turn.
        logged_seqs = [[event.seq for event in events if event.seq] for events in seen]
        assert logged_seqs[0] == logged_seqs[1] == logged_seqs[2], f"trial {trial}: the streams saw different turns"
        stored_id = await assert_stored_once(replicated, trial, conversation_id, [e for e in seen[0] if e.seq])
        replies = [event for events in seen for event in events if event.seq == 0]
        assert len(replies) == 2, (trial, replies)
        acknowledgements += [(trial, reply, stored_id) for reply in replies]
    assert_acknowledged(acknowledgements)


async def test_the_same_message_sent_through_two_replicas_at_once_is_stored_once_and_answered_once(replicated):
    """Two streams on gateway a and one on gateway b: whichever replica wins runs the one turn."""
    trials = await asyncio.gather(*(
        one_message_on_three_streams(replicated, t, gateways="aab", to_turn_end=False) for t in range(TRIALS)
    ))
    acknowledgements = []
    for trial, (seen, conversation_id) in enumerate(trials):
        answering = [events for events in seen if not any(is_reply(event) for event in events)]
        assert len(answering) == 1, f"trial {trial}: {len(answering)} streams ran a turn"
        stored_id = await assert_stored_once(replicated, trial, conversation_id, answering[0])
        acknowledgements += [(trial, events[-1], stored_id) for events in seen if is_reply(events[-1])]
    assert len(acknowledgements) == 2 * TRIALS
    assert_acknowledged(acknowledgements)
