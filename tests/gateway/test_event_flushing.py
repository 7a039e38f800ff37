"""The gateway's event flusher against a real session_service: every dirty session's events go to the log
in ONE AppendEventBatches call per tick; refused batches stay and are retried; flush() and the flusher
never send an event twice or out of order."""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from chat_helpers import ChatStream, kinds

from duplex.chat.v1 import chat_pb2
from duplex.common.server import GrpcServer
from duplex.session.v1 import session_pb2, session_pb2_grpc
from gateway import hub as hub_module
from gateway.clients import SessionClient
from gateway.hub import UNLOGGED_LIMIT, HubRegistry, LogUnreachable, SessionHub
from session_service.server import create_server
from session_service.servicer import SessionServicer
from session_service.settings import SessionSettings

FLUSH_INTERVAL = 0.02
OUTAGE_SECONDS = 0.5
USER = "alice"
APPEND = "/duplex.session.v1.SessionService/AppendEvents"
APPEND_BATCHES = "/duplex.session.v1.SessionService/AppendEventBatches"


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


@dataclass
class CountingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Records every unary call the gateway's session client makes; delays batch calls by `batch_delay` and
    fails the next `failures` of them."""

    calls: list[tuple[str, object]] = field(default_factory=list)
    failures: int = 0
    batch_delay: float = 0.0
    lost_answers: int = 0  # batch calls that land, then fail as if their answer never came back

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = _method(client_call_details)
        self.calls.append((method, request))
        if method == APPEND_BATCHES and self.batch_delay:
            await asyncio.sleep(self.batch_delay)
        if method == APPEND_BATCHES and self.failures > 0:
            self.failures -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "injected failure"
            )
        call = await continuation(client_call_details, request)
        if method == APPEND_BATCHES and self.lost_answers > 0:
            await call  # landed
            self.lost_answers -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "answer lost"
            )
        return call

    def requests(self, method: str) -> list:
        return [request for called, request in self.calls if called == method]


@dataclass
class Rig:
    registry: HubRegistry
    sessions: SessionClient
    calls: CountingInterceptor
    stub: session_pb2_grpc.SessionServiceStub  # a plain one, beside the gateway's client

    async def new_hub(self, last_seq: int = 0) -> SessionHub:
        session_id = (await self.sessions.open(USER)).session.session_id
        return self.registry.acquire(session_id, USER, last_seq)

    async def logged(self, session_id: str) -> list[chat_pb2.ChatEvent]:
        events = self.sessions.read_events(USER, session_id, 0, follow=False)
        return [chat_pb2.ChatEvent.FromString(event.payload) async for event in events]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server: GrpcServer = await create_server(
        SessionSettings(session_listen="127.0.0.1:0", redis_url=None, history_target="", shutdown_grace_seconds=0)
    )
    calls = CountingInterceptor()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[calls])
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    sessions = SessionClient(channel, timeout=5.0)
    registry = HubRegistry(
        sessions, capacity=1024, capacity_bytes=1 << 20, flush_interval=FLUSH_INTERVAL, owner="gw",
        lease_renew_interval=60,
        outage_seconds=OUTAGE_SECONDS,
    )
    rig = Rig(registry, sessions, calls, session_pb2_grpc.SessionServiceStub(plain))
    try:
        yield rig
    finally:
        await registry.close()
        await channel.close()
        await plain.close()
        await server.stop(0)


def delta(text: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(turn_id="t1", delta=chat_pb2.TextDelta(text=text))


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_many_sessions_flush_through_one_call_per_tick(rig):
    hubs = [await rig.new_hub() for _ in range(50)]
    rig.registry.start()
    rig.calls.calls.clear()

    started = time.monotonic()
    for n in range(40):
        for hub in hubs:  # every session produces a token at once, as many streams do under load
            hub.publish(delta(f"{hub.session_id}:{n}"))
        await asyncio.sleep(0.005)
    await eventually(lambda: all(hub.logged_seq == 40 for hub in hubs))
    elapsed = time.monotonic() - started

    assert rig.calls.requests(APPEND) == []  # no call per session
    batch_calls = rig.calls.requests(APPEND_BATCHES)
    assert 1 <= len(batch_calls) <= elapsed / FLUSH_INTERVAL + 2  # at most one per tick
    # Every session dirty in a tick is in that tick's one call.
    assert {len(request.batches) for request in batch_calls} == {50}
    for hub in hubs:
        texts = [event.delta.text for event in await rig.logged(hub.session_id)]
        assert texts == [f"{hub.session_id}:{n}" for n in range(40)]


async def test_a_refused_batch_stays_and_is_retried_while_the_others_land(rig, caplog):
    fine = await rig.new_hub()
    # This hub believes the log holds one event that never arrived (as if another writer were late): its
    # next event, seq 2, is a gap the log refuses until seq 1 is there.
    behind = await rig.new_hub(last_seq=1)
    lost = rig.registry.acquire("0" * 32, USER, 0)  # a session the service does not know
    for hub in (fine, behind, lost):
        hub.publish(delta("a"))
        hub.publish(delta("b"))
    rig.registry.start()

    with caplog.at_level(logging.WARNING, logger="gateway.hub"):
        await eventually(lambda: fine.logged_seq == 2)
        await eventually(lambda: f"session {behind.session_id}: logging events failed" in caplog.text)
    assert "expected seq 1" in caplog.text
    assert [event.seq for event in await rig.logged(fine.session_id)] == [1, 2]
    assert behind.has_unflushed and behind.logged_seq == 1
    # A session the service does not know can never take its events: dropped once, said once, not retried.
    assert f"session {lost.session_id} is gone from the session service" in caplog.text
    assert lost.lost is not None and not lost.has_unflushed

    # Once the log can take them, the kept events land, in order, exactly once.
    await rig.stub.AppendEvents(session_pb2.AppendEventsRequest(
        session_id=behind.session_id, events=[session_pb2.LogEvent(seq=1, turn_id="t0", payload=b"")]
    ))
    await eventually(lambda: behind.logged_seq == 3)
    assert [event.seq for event in await rig.logged(behind.session_id)][1:] == [2, 3]
    assert not behind.has_unflushed


async def test_a_failed_call_keeps_every_session_s_events_and_retries_them_in_order(rig, caplog):
    hubs = [await rig.new_hub() for _ in range(5)]
    rig.calls.failures = 3
    rig.registry.start()

    with caplog.at_level(logging.INFO, logger="gateway.hub"):
        for n in range(10):
            for hub in hubs:
                hub.publish(delta(str(n)))
            await asyncio.sleep(0.01)
        await eventually(lambda: all(hub.logged_seq == 10 for hub in hubs))
    # Said once when it started failing and once when it was back, not on every retry nor for every session.
    assert len(caplog.records) == 2
    assert "logging events to the session service failed (session service is unavailable); retrying" in caplog.text
    assert "logging events to the session service works again after" in caplog.text
    assert "(3 failed attempts)" in caplog.text
    assert rig.calls.failures == 0
    for hub in hubs:
        assert [event.delta.text for event in await rig.logged(hub.session_id)] == [str(n) for n in range(10)]


async def test_followers_held_back_by_the_unlogged_limit_go_on_once_a_batch_lands(rig):
    hub = await rig.new_hub()
    rig.calls.failures = 10**6  # nothing reaches the log for now
    rig.registry.start()
    for n in range(UNLOGGED_LIMIT + 8):
        hub.publish(delta(str(n)))

    seen: list[int] = []

    async def follow() -> None:
        async for event in hub.follow(0):
            seen.append(event.seq)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)  # several failed ticks
    assert seen == list(range(1, UNLOGGED_LIMIT + 1))  # never further ahead of the log than the limit
    rig.calls.failures = 0
    await asyncio.wait_for(follower, 3)  # woken when the batch lands, not by another publish
    assert seen == list(range(1, UNLOGGED_LIMIT + 9))
    assert hub.logged_seq == UNLOGGED_LIMIT + 8


async def test_flush_and_the_flusher_never_send_an_event_twice_or_out_of_order(rig, caplog):
    hubs = [await rig.new_hub() for _ in range(10)]
    rig.calls.batch_delay = 0.005  # a slow batch call: a flush() sending around it would overtake it
    rig.registry.start()
    randomness = random.Random(7)

    async def produce(hub: SessionHub) -> None:
        for n in range(60):
            hub.publish(delta(str(n)))
            if randomness.random() < 0.2:
                await hub.flush()  # as a turn's end or a reader of older events does, racing the flusher
            else:
                await asyncio.sleep(randomness.random() * 0.004)

    with caplog.at_level(logging.WARNING, logger="gateway.hub"):
        await asyncio.gather(*(produce(hub) for hub in hubs), *(hub.flush() for hub in hubs))
        await asyncio.gather(*(hub.flush() for hub in hubs))
    assert "failed" not in caplog.text  # the log refuses gaps and repeats: none were sent
    for hub in hubs:
        assert hub.logged_seq == 60 and not hub.has_unflushed
        assert [event.delta.text for event in await rig.logged(hub.session_id)] == [str(n) for n in range(60)]
    assert rig.calls.requests(APPEND_BATCHES)  # both paths were in play
    assert rig.calls.requests(APPEND)


async def test_a_backlog_is_split_into_calls_within_the_bounds(rig, monkeypatch):
    monkeypatch.setattr(hub_module, "MAX_SESSIONS_PER_APPEND", 3)
    monkeypatch.setattr(hub_module, "MAX_EVENTS_PER_APPEND", 5)
    hubs = [await rig.new_hub() for _ in range(7)]
    backlog = await rig.new_hub()
    for hub in hubs:
        hub.publish(delta("x"))
    for n in range(12):
        backlog.publish(delta(str(n)))
    rig.calls.calls.clear()

    await rig.registry._flush_dirty()  # one tick

    calls = rig.calls.requests(APPEND_BATCHES)
    assert all(len(call.batches) <= 3 and sum(len(b.events) for b in call.batches) <= 5 for call in calls)
    assert sorted(hub.logged_seq for hub in hubs) == [1] * 7
    assert backlog.logged_seq == 5  # one call's worth; the rest goes in the next ticks
    await rig.registry._flush_dirty()
    await rig.registry._flush_dirty()
    assert backlog.logged_seq == 12 and not backlog.has_unflushed
    assert [event.delta.text for event in await rig.logged(backlog.session_id)] == [str(n) for n in range(12)]


# -- through the whole gateway


@pytest.fixture
def counted_batches(monkeypatch) -> list[session_pb2.AppendEventBatchesRequest]:
    """Every AppendEventBatches request the session service gets (patched before the system starts)."""
    seen: list[session_pb2.AppendEventBatchesRequest] = []
    original = SessionServicer.AppendEventBatches

    async def counting(self, request, context):
        seen.append(request)
        return await original(self, request, context)

    monkeypatch.setattr(SessionServicer, "AppendEventBatches", counting)
    return seen


async def test_concurrent_chats_share_one_log_call_per_tick(make_system, counted_batches):
    system = await make_system(tokens_per_second=50)
    started = time.monotonic()

    async def one(n: int) -> None:
        chat = ChatStream(system.chat)
        await chat.open()
        await chat.say(f"number {n}, please answer at some length")
        events = await chat.until_turn_ends(timeout=30)
        chat.cancel()
        assert kinds(events)[-1] == "turn_completed"

    await asyncio.gather(*(one(n) for n in range(20)))
    elapsed = time.monotonic() - started
    assert len(counted_batches) <= elapsed / FLUSH_INTERVAL + 2
    # While the answers streamed side by side, calls carried many sessions at once.
    assert max(len(request.batches) for request in counted_batches) >= 10


async def test_a_follower_held_back_by_a_log_that_keeps_failing_ends_with_a_retryable_error(rig):
    hub = await rig.new_hub()
    rig.calls.failures = 10**6  # the session service does not answer
    rig.registry.start()
    for n in range(UNLOGGED_LIMIT + 8):
        hub.publish(delta(str(n)))

    seen: list[int] = []
    started = time.monotonic()
    with pytest.raises(LogUnreachable) as ended:
        async with asyncio.timeout(5):
            async for event in hub.follow(0):
                seen.append(event.seq)
    assert OUTAGE_SECONDS <= time.monotonic() - started < OUTAGE_SECONDS + 1
    assert seen == list(range(1, UNLOGGED_LIMIT + 1))
    assert ended.value.retryable and f"resume after seq {UNLOGGED_LIMIT}" in ended.value.message

    # Nothing was dropped: once the service answers, the events land and a resume gets the rest.
    rig.calls.failures = 0
    await eventually(lambda: hub.logged_seq == UNLOGGED_LIMIT + 8)
    rest = []
    async for event in hub.follow(UNLOGGED_LIMIT):
        rest.append(event.seq)
    assert rest == list(range(UNLOGGED_LIMIT + 1, UNLOGGED_LIMIT + 9))


async def test_a_follower_that_resumes_as_the_log_comes_back_is_given_the_outage_time_of_its_own(rig):
    """A client resuming right after the session service is back must not be told it is down because the
    flusher's last failure was a moment ago: a follower ends only once it has itself been held back that long."""
    hub = await rig.new_hub()
    rig.calls.failures = 10**6
    rig.registry.start()
    for n in range(UNLOGGED_LIMIT + 8):
        hub.publish(delta(str(n)))
    await eventually(lambda: hub.logging.lasted(OUTAGE_SECONDS))

    seen: list[int] = []

    async def follow() -> None:
        async for event in hub.follow(0):
            seen.append(event.seq)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(OUTAGE_SECONDS / 2)
    assert not follower.done() and seen == list(range(1, UNLOGGED_LIMIT + 1))
    rig.calls.failures = 0  # the service is back
    await asyncio.wait_for(follower, 3)
    assert seen == list(range(1, UNLOGGED_LIMIT + 9))


async def test_events_whose_append_landed_but_whose_answer_was_lost_are_logged_once(rig, caplog):
    hubs = [await rig.new_hub() for _ in range(3)]
    rig.calls.lost_answers = 2
    for hub in hubs:
        for n in range(5):
            hub.publish(delta(str(n)))
    with caplog.at_level(logging.WARNING, logger="gateway.hub"):
        rig.registry.start()
        await eventually(lambda: all(hub.logged_seq == 5 for hub in hubs))
    assert rig.calls.lost_answers == 0
    assert "expected seq" not in caplog.text  # the retry was not refused as a gap
    for hub in hubs:
        assert [event.delta.text for event in await rig.logged(hub.session_id)] == [str(n) for n in range(5)]


async def test_a_flush_cancelled_mid_call_keeps_its_events(rig):
    hub = await rig.new_hub()
    for n in range(3):
        hub.publish(delta(str(n)))
    flushing = asyncio.create_task(hub.flush())
    await asyncio.sleep(0)  # the call is under way
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert hub.has_unflushed  # nothing dropped, whether or not the call landed
    rig.registry.start()
    await eventually(lambda: hub.logged_seq == 3)
    assert [event.delta.text for event in await rig.logged(hub.session_id)] == ["0", "1", "2"]


async def test_an_end_sent_by_another_path_meanwhile_is_not_sent_again(rig):
    """The flusher lists a hub whose turn's end is unsent, then a new turn's start sends it first: the
    flusher's turn comes with nothing left to send, which is no error (it once raised on the missing end)."""
    hub = await rig.new_hub()
    hub.unsent_end = hub_module.TurnEnd("t1", 3, 0)
    assert await hub.send_end() and hub.unsent_end is None
    assert await hub.send_end()  # nothing to send
    await rig.registry._send_end(hub)  # as the flusher does for a hub it listed before the end went
    assert hub.unsent_end is None


def test_the_replay_buffer_keeps_the_latest_events_within_its_count_and_byte_budget():
    """A session's memory is bounded by events and by bytes (a spoken answer's audio is large); what fell
    out is None (read it from the log), what is kept comes back exactly."""
    recent = hub_module.RecentEvents(max_events=100, max_bytes=10_000)
    for seq in range(1, 301):
        recent.append(chat_pb2.ChatEvent(seq=seq, delta=chat_pb2.TextDelta(text=str(seq))).SerializeToString())
    assert [event.seq for event in recent.after(250, 300)] == list(range(251, 301))
    assert len(recent.after(200, 300)) == 100 and recent.after(199, 300) is None
    assert recent.after(300, 300) == []
    audio = chat_pb2.ChatEvent(audio=chat_pb2.AudioOutput(data=b"\0" * 4_000))
    for seq in range(301, 311):
        audio.seq = seq
        recent.append(audio.SerializeToString())
    kept = recent.after(300, 310)
    assert kept is None  # 10 x 4 KB is over 10 KB: the oldest audio went too
    assert [event.seq for event in recent.after(308, 310)] == [309, 310]
    assert recent.after(307, 310) is None  # two 4 KB events fit in 10 KB, three do not
    big = chat_pb2.ChatEvent(seq=311, audio=chat_pb2.AudioOutput(data=b"\0" * 20_000)).SerializeToString()
    recent.append(big)
    assert [event.seq for event in recent.after(310, 311)] == [311]  # one event is always kept
