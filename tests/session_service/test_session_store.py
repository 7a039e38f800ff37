"""MemorySessionStore on its own, with a fake clock where time matters."""

import asyncio

import pytest

from duplex.common.errors import NotFound, OutOfRange, ResourceExhausted
from session_service.quota import DAY_SECONDS, QuotaLimits
from session_service.store import MAX_REMEMBERED_TURNS, LogEntry, MemorySessionStore

TTL = 100.0
LEASE = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock):
    # Not started: no sweeper, so these tests see only what access-time checks do.
    store = MemorySessionStore(ttl_seconds=TTL, log_max_events=5, turn_lease_seconds=LEASE, clock=clock)
    yield store
    await store.close()


def entries(seqs, turn_id: str = "t1") -> list[LogEntry]:
    return [LogEntry(seq=seq, turn_id=turn_id, payload=bytes([seq % 256])) for seq in seqs]


async def new_session(store: MemorySessionStore) -> str:
    info, _ = await store.open_session("alice", "", conversation_id="c", model="", system_prompt="")
    return info.session_id


async def test_get_does_not_refresh_the_ttl_but_open_append_and_begin_do(store, clock):
    session_id = await new_session(store)
    created = await store.get_session("alice", session_id)
    assert created.expires_at == clock.now + TTL

    clock.advance(TTL / 2)
    assert (await store.get_session("alice", session_id)).expires_at == created.expires_at

    for touch in (
        lambda: store.open_session("alice", session_id, conversation_id="", model="", system_prompt=""),
        lambda: store.append_events(session_id, entries([1])),
        lambda: store.begin_turn("alice", session_id, "t1"),
    ):
        clock.advance(1)
        await touch()
        assert (await store.get_session("alice", session_id)).expires_at == clock.now + TTL


async def test_an_expired_session_is_removed_on_access(store, clock):
    session_id = await new_session(store)
    clock.advance(TTL)
    with pytest.raises(NotFound):
        await store.get_session("alice", session_id)
    assert store.session_count() == 0


async def test_the_sweeper_removes_expired_sessions_nobody_touches():
    store = MemorySessionStore(ttl_seconds=0.05, log_max_events=5, turn_lease_seconds=LEASE)
    await store.start()
    try:
        await new_session(store)
        assert store.session_count() == 1
        await asyncio.sleep(0.3)
        assert store.session_count() == 0
    finally:
        await store.close()


async def test_an_expired_lease_is_not_running_and_appends_do_not_revive_it(store, clock):
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    clock.advance(LEASE - 1)
    await store.append_events(session_id, entries([1]))  # renews: lease now ends at +LEASE from here
    clock.advance(LEASE - 1)
    assert (await store.get_session("alice", session_id)).active_turn_id == "t1"

    clock.advance(1)
    assert (await store.get_session("alice", session_id)).active_turn_id == ""
    await store.append_events(session_id, entries([2]))
    assert (await store.get_session("alice", session_id)).active_turn_id == ""
    await store.begin_turn("alice", session_id, "t2")
    assert (await store.get_session("alice", session_id)).active_turn_id == "t2"


async def test_the_log_keeps_only_the_newest_events(store):
    session_id = await new_session(store)
    await store.append_events(session_id, entries(range(1, 4)))
    await store.append_events(session_id, entries(range(4, 9)))
    batches = [batch async for batch in store.read_events("alice", session_id, 3, follow=False)]
    assert [entry.seq for batch in batches for entry in batch] == [4, 5, 6, 7, 8]
    assert batches[0][0].payload == bytes([4])


async def test_a_reader_overtaken_by_trimming_fails_instead_of_skipping(store):
    session_id = await new_session(store)
    await store.append_events(session_id, entries(range(1, 4)))
    reader = store.read_events("alice", session_id, 0, follow=False)
    assert [entry.seq for entry in await anext(reader)] == [1, 2, 3]
    # While the reader holds seq 3, six more events push 4 out of the 5-event log.
    await store.append_events(session_id, entries(range(4, 10)))
    with pytest.raises(OutOfRange):
        await anext(reader)


async def test_closing_the_store_ends_followers():
    store = MemorySessionStore(ttl_seconds=TTL, log_max_events=5, turn_lease_seconds=LEASE)
    await store.start()
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")

    async def follow() -> list[int]:
        return [e.seq async for batch in store.read_events("alice", session_id, 0, follow=True) for e in batch]

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.02)
    assert not following.done()
    await store.close()
    assert await asyncio.wait_for(following, 1) == []
    assert store.session_count() == 0


async def test_followers_wake_for_every_append_without_polling(store):
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    reader = store.read_events("alice", session_id, 0, follow=True)
    waiting = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await store.append_events(session_id, entries([1]))
    assert [entry.seq for entry in await asyncio.wait_for(waiting, 1)] == [1]
    await store.end_turn(session_id, "t1")
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(reader), 1)


# -- turn bookkeeping


async def test_only_the_newest_turn_states_are_kept(store):
    session_id = await new_session(store)
    turns = [f"t{i}" for i in range(MAX_REMEMBERED_TURNS + 20)]
    for turn_id in turns:
        await store.begin_turn("alice", session_id, turn_id)
        await store.end_turn(session_id, turn_id)
    await store.begin_turn("alice", session_id, "now")

    states = store._sessions[session_id].turn_states
    assert list(states) == [*turns[-(MAX_REMEMBERED_TURNS - 1) :], "now"]
    assert set(states.values()) == {"ended", "begun"} and states["now"] == "begun"


async def test_the_active_turn_state_is_never_forgotten(store):
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "now")
    session = store._sessions[session_id]
    # More states than the bound with the active turn the oldest: a retry of it trims the others.
    session.turn_states.update({f"old{i}": "ended" for i in range(MAX_REMEMBERED_TURNS + 50)})
    await store.begin_turn("alice", session_id, "now")
    assert len(session.turn_states) == MAX_REMEMBERED_TURNS
    assert next(iter(session.turn_states)) == "now"
    assert "old50" not in session.turn_states and "old51" in session.turn_states  # 51 too many, oldest first


# -- quotas, with the fake clock


def quota_store(clock: FakeClock, messages: int = 0, tokens: int = 0, audio: int = 0) -> MemorySessionStore:
    limits = QuotaLimits(messages_per_minute=messages, tokens_per_day=tokens, audio_seconds_per_day=audio)
    return MemorySessionStore(
        ttl_seconds=TTL, log_max_events=5, turn_lease_seconds=LEASE, quota_limits=limits, clock=clock
    )


async def test_the_message_window_slides(clock):
    store = quota_store(clock, messages=2)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    await store.end_turn(session_id, "t1")
    clock.advance(10)
    await store.begin_turn("alice", session_id, "t2")
    await store.end_turn(session_id, "t2")

    clock.advance(20)
    with pytest.raises(ResourceExhausted) as refused:
        await store.begin_turn("alice", session_id, "t3")
    # The first message (30 s ago) leaves the window in 30 s.
    assert refused.value.retry_after == pytest.approx(30)

    clock.advance(30)
    started = await store.begin_turn("alice", session_id, "t3")
    assert started.quota.messages_remaining == 0


async def test_the_token_count_starts_afresh_at_utc_midnight(clock):
    clock.now = 20_000 * DAY_SECONDS - 10  # ten seconds before a UTC midnight
    store = quota_store(clock, tokens=100)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    await store.end_turn(session_id, "t1", tokens=100)
    with pytest.raises(ResourceExhausted) as refused:
        await store.begin_turn("alice", session_id, "t2")
    assert refused.value.retry_after == pytest.approx(10)

    clock.advance(10)
    started = await store.begin_turn("alice", session_id, "t2")
    assert started.quota.tokens_remaining == 100


async def test_a_retried_begin_turn_after_the_lease_ran_out_counts_nothing(clock):
    store = quota_store(clock, messages=1)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1", owner="gw")
    clock.advance(LEASE + 1)
    # The session's own turn, begun again by its owner: a retry, not a second message.
    started = await store.begin_turn("alice", session_id, "t1", owner="gw")
    assert started.quota.messages_remaining == 0
    assert (await store.get_session("alice", session_id)).active_turn_id == "t1"


async def test_the_audio_count_starts_afresh_at_utc_midnight(clock):
    clock.now = 20_000 * DAY_SECONDS - 10  # ten seconds before a UTC midnight
    store = quota_store(clock, audio=60)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1", uses_audio=True)
    await store.end_turn(session_id, "t1", audio_ms=60_000)
    with pytest.raises(ResourceExhausted) as refused:
        await store.begin_turn("alice", session_id, "t2", uses_audio=True)
    assert refused.value.retry_after == pytest.approx(10)

    clock.advance(10)
    started = await store.begin_turn("alice", session_id, "t2", uses_audio=True)
    assert started.quota.audio_seconds_remaining == 60


async def test_yesterdays_audio_is_forgotten(clock):
    store = quota_store(clock, audio=60)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1", uses_audio=True)
    await store.end_turn(session_id, "t1", audio_ms=1000)
    assert store._quotas._audio
    clock.advance(DAY_SECONDS)
    await store._housekeep()
    assert not store._quotas._audio
