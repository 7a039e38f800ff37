"""RedisSessionStore as several replicas see it: two store instances (two replicas) on one Redis.

Tests taking `make_replica` run twice: on a single Redis and on a three-master Redis Cluster."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from duplex.common.errors import FailedPrecondition, NotFound, OutOfRange, ResourceExhausted, Unavailable
from session_service.quota import DAY_SECONDS, QuotaLimits
from session_service.redis_store import (
    MAX_FOLLOW_BLOCK_MS,
    RedisClient,
    RedisKeys,
    RedisSessionStore,
    connect,
    redact_url,
)
from session_service.session_end import HistoryRecorder
from session_service.store import MAX_REMEMBERED_TURNS, EventBatch, LogEntry, TurnStart
from tests.redis_fixtures import free_port

TTL = 60.0
# Well under MAX_FOLLOW_BLOCK_MS: a follower ending this fast was woken, not timed out.
PROMPT_SECONDS = 0.5

MakeReplica = Callable[..., Awaitable[RedisSessionStore]]


@dataclass(frozen=True)
class Target:
    url: str
    prefix: str
    cluster: bool


@pytest.fixture(params=["redis", "redis-cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """The Redis the replicas share, and the key prefix of this test."""
    if request.param == "redis-cluster":
        cluster_url = request.getfixturevalue("redis_cluster_url")
        return Target(cluster_url, request.getfixturevalue("redis_cluster_key_prefix"), cluster=True)
    return Target(request.getfixturevalue("redis_url"), request.getfixturevalue("redis_key_prefix"), cluster=False)


@pytest.fixture
def key_prefix(target: Target) -> str:
    return target.prefix


@pytest.fixture
async def redis_client(target: Target) -> AsyncIterator[RedisClient]:
    """A plain client of the same Redis (or cluster), to look at keys."""
    client = connect(target.url, cluster=target.cluster)
    yield client
    await client.aclose()


@pytest.fixture
async def make_replica(target: Target) -> AsyncIterator[MakeReplica]:
    """Each call is one more replica: its own client and pool, the same Redis and key prefix."""
    stores: list[RedisSessionStore] = []
    recorders: list[HistoryRecorder] = []

    async def make(history_target: str = "", **overrides) -> RedisSessionStore:
        options = {"ttl_seconds": TTL, "log_max_events": 1000, "turn_lease_seconds": 30.0, **overrides}
        if history_target:
            recorders.append(HistoryRecorder(history_target))
            options["recorder"] = recorders[-1]
        store = RedisSessionStore(connect(target.url, cluster=target.cluster), key_prefix=target.prefix, **options)
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    for recorder in recorders:
        await recorder.close()


def entries(seqs, turn_id: str = "t1") -> list[LogEntry]:
    # Non-UTF-8 payloads: they must travel as opaque bytes.
    return [LogEntry(seq=seq, turn_id=turn_id, payload=b"\xff\x00" + bytes([seq % 256])) for seq in seqs]


async def new_session(store: RedisSessionStore, user_id: str = "alice") -> str:
    info, _ = await store.open_session(user_id, "", conversation_id="c", model="", system_prompt="")
    return info.session_id


class Follow:
    """read_events(follow=True) consumed in a background task."""

    def __init__(self, store: RedisSessionStore, session_id: str, after_seq: int = 0) -> None:
        self.events: list[LogEntry] = []
        self.finished = False
        self._arrived = asyncio.Condition()
        self.task = asyncio.create_task(self._run(store, session_id, after_seq))

    async def _run(self, store: RedisSessionStore, session_id: str, after_seq: int) -> None:
        try:
            async for batch in store.read_events("alice", session_id, after_seq, follow=True):
                async with self._arrived:
                    self.events.extend(batch)
                    self._arrived.notify_all()
        finally:
            async with self._arrived:
                self.finished = True
                self._arrived.notify_all()

    def seqs(self) -> list[int]:
        return [event.seq for event in self.events]

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.events) >= count or self.finished)

        await asyncio.wait_for(enough(), timeout)
        assert len(self.events) >= count, self.seqs()

    async def ended_within(self, seconds: float) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(asyncio.shield(self.task), seconds)
        return loop.time() - started


@pytest.fixture
async def follow() -> AsyncIterator[Callable[..., Follow]]:
    started: list[Follow] = []

    def start(store: RedisSessionStore, session_id: str, after_seq: int = 0) -> Follow:
        started.append(Follow(store, session_id, after_seq))
        return started[-1]

    yield start
    for follower in started:
        follower.task.cancel()
    await asyncio.gather(*(follower.task for follower in started), return_exceptions=True)


# -- following across replicas


async def test_a_follower_on_one_replica_gets_what_another_appends_once_and_ends_after_end_turn(make_replica, follow):
    a, b = await make_replica(), await make_replica()
    session_id = await new_session(a)
    await a.begin_turn("alice", session_id, "t1", owner="gw-a")
    await a.append_events(session_id, entries([1, 2]))
    follower = follow(b, session_id, after_seq=1)

    async def write() -> None:
        for start in range(3, 201, 7):
            await a.append_events(session_id, entries(range(start, min(start + 7, 201))))
            await asyncio.sleep(0)

    await write()
    await follower.wait_for(199)
    assert not follower.task.done()

    await a.end_turn(session_id, "t1")
    assert await follower.ended_within(PROMPT_SECONDS) < PROMPT_SECONDS
    assert follower.events == entries(range(2, 201))


async def test_a_close_on_one_replica_ends_a_follower_on_another_promptly(make_replica, follow):
    a, b = await make_replica(), await make_replica()
    session_id = await new_session(a)
    await a.begin_turn("alice", session_id, "t1")
    await a.append_events(session_id, entries([1]))
    follower = follow(b, session_id)
    await follower.wait_for(1)

    await a.close_session("alice", session_id)
    await follower.ended_within(PROMPT_SECONDS)
    assert follower.seqs() == [1]
    with pytest.raises(NotFound):
        await b.get_session("alice", session_id)


class CountingRedis(aioredis.Redis):
    """Counts the commands this one client sends, whatever else talks to the same Redis."""

    commands = 0  # an instance attribute from the first increment on

    async def execute_command(self, *args, **options):
        self.commands += 1
        return await super().execute_command(*args, **options)


async def test_a_waiting_follower_does_not_poll(redis_url, redis_key_prefix, follow):
    client = CountingRedis.from_pool(aioredis.ConnectionPool.from_url(redis_url))
    store = RedisSessionStore(
        client, key_prefix=redis_key_prefix, ttl_seconds=TTL, log_max_events=10, turn_lease_seconds=30
    )
    try:
        session_id = await new_session(store)
        await store.begin_turn("alice", session_id, "t1")
        follower = follow(store, session_id)
        await asyncio.sleep(0.1)

        before = client.commands
        await asyncio.sleep(1.0)
        # A blocked XREAD and, each time its bound passes, one snapshot and the next XREAD.
        assert client.commands - before <= 2 * (1000 // MAX_FOLLOW_BLOCK_MS + 1)
        assert not follower.task.done()
    finally:
        await store.close()


class CountingRedisCluster(RedisCluster):
    """CountingRedis for a cluster."""

    commands = 0

    async def execute_command(self, *args, **options):
        self.commands += 1
        return await super().execute_command(*args, **options)


async def test_appending_to_many_sessions_is_one_round_trip_per_slot(target, make_replica):
    """One script for all sessions on a single Redis; on a cluster one per shard (each its own slot)."""
    if target.cluster:
        client = CountingRedisCluster.from_url(target.url)
    else:
        client = CountingRedis.from_pool(aioredis.ConnectionPool.from_url(target.url))
    store = RedisSessionStore(
        client, key_prefix=target.prefix, ttl_seconds=TTL, log_max_events=10, turn_lease_seconds=30
    )
    other_replica = await make_replica()
    try:
        sessions = [await new_session(store) for _ in range(20)]
        # Loads the script wherever it runs.
        await store.append_event_batches([EventBatch(session_id, entries([1])) for session_id in sessions])

        before = client.commands
        outcomes = await store.append_event_batches(
            [EventBatch(session_id, entries([2, 3])) for session_id in sessions]
            + [EventBatch("0" * 32, entries([1])), EventBatch("no-such-id", entries([1]))]
        )
        shards = {session_id[0] for session_id in [*sessions, "0" * 32]}
        assert client.commands - before == (len(shards) if target.cluster else 1)
        assert outcomes[:20] == [3] * 20
        assert [type(outcome) for outcome in outcomes[20:]] == [NotFound, NotFound]
        for session_id in sessions:
            assert (await other_replica.get_session("alice", session_id)).last_seq == 3
    finally:
        await store.close()


# -- turns and leases across replicas


async def test_a_lease_that_ran_out_on_one_replica_is_taken_over_on_another(make_replica, follow):
    a, b = await make_replica(turn_lease_seconds=0.6), await make_replica(turn_lease_seconds=0.6)
    session_id = await new_session(a)
    await a.begin_turn("alice", session_id, "t1", owner="gw-a")
    with pytest.raises(FailedPrecondition):
        await b.begin_turn("alice", session_id, "t2", owner="gw-b")
    follower = follow(b, session_id)
    # Nobody appends for t1: the follower stops waiting once its lease is over.
    await follower.ended_within(0.6 + PROMPT_SECONDS)

    await b.begin_turn("alice", session_id, "t2", owner="gw-b")
    info = await a.get_session("alice", session_id)
    assert (info.active_turn_id, info.active_turn_owner) == ("t2", "gw-b")
    # The old owner's late EndTurn does not end the new turn.
    await a.end_turn(session_id, "t1")
    assert (await b.get_session("alice", session_id)).active_turn_id == "t2"


async def test_the_message_quota_holds_under_concurrency_across_replicas(make_replica):
    limits = QuotaLimits(messages_per_minute=5)
    a, b = await make_replica(quota_limits=limits), await make_replica(quota_limits=limits)
    sessions = [await new_session(a) for _ in range(20)]

    results = await asyncio.gather(
        *((a, b)[i % 2].begin_turn("alice", session_id, f"t{i}") for i, session_id in enumerate(sessions)),
        return_exceptions=True,
    )
    started = [result for result in results if isinstance(result, TurnStart)]
    refused = [result for result in results if isinstance(result, ResourceExhausted)]
    assert (len(started), len(refused)) == (5, 15), results
    assert sorted(result.quota.messages_remaining for result in started) == [0, 1, 2, 3, 4]
    assert all(0 < error.retry_after <= 60 for error in refused)
    active = [(await a.get_session("alice", session_id)).active_turn_id for session_id in sessions]
    assert sum(1 for turn in active if turn) == 5


async def test_the_token_quota_is_shared_and_counted_once_across_replicas(make_replica):
    limits = QuotaLimits(tokens_per_day=100)
    a, b = await make_replica(quota_limits=limits), await make_replica(quota_limits=limits)
    session_id = await new_session(a)
    await a.begin_turn("alice", session_id, "t1")
    await a.end_turn(session_id, "t1", tokens=60)
    await b.end_turn(session_id, "t1", tokens=60)  # a retry that landed on the other replica
    started = await b.begin_turn("alice", session_id, "t2")
    assert started.quota.tokens_remaining == 40

    await b.end_turn(session_id, "t2", tokens=40)
    with pytest.raises(ResourceExhausted) as refused:
        await a.begin_turn("alice", session_id, "t3")
    assert refused.value.retry_after > 0
    assert (await a.get_session("alice", session_id)).active_turn_id == ""


async def test_the_audio_quota_is_shared_and_counted_once_across_replicas(make_replica):
    limits = QuotaLimits(audio_seconds_per_day=60)
    a, b = await make_replica(quota_limits=limits), await make_replica(quota_limits=limits)
    session_id = await new_session(a)
    await a.begin_turn("alice", session_id, "t1", uses_audio=True)
    await a.end_turn(session_id, "t1", audio_ms=40_000)
    await b.end_turn(session_id, "t1", audio_ms=40_000)  # a retry that landed on the other replica
    started = await b.begin_turn("alice", session_id, "t2", uses_audio=True)
    assert started.quota.audio_seconds_remaining == 20

    await b.end_turn(session_id, "t2", audio_ms=20_000)
    with pytest.raises(ResourceExhausted) as refused:
        await a.begin_turn("alice", session_id, "t3", uses_audio=True)
    assert "audio quota" in refused.value.message and refused.value.retry_after > 0
    assert (await a.begin_turn("alice", session_id, "t3")).quota.audio_seconds_remaining == 0


# -- expiry and end records


async def test_expiry_is_recorded_exactly_once_with_two_replicas_sweeping(make_replica, start_history):
    history = await start_history()
    a = await make_replica(history.target, ttl_seconds=0.3)
    b = await make_replica(history.target, ttl_seconds=0.3)
    sessions = [await new_session((a, b)[i % 2]) for i in range(6)]

    await history.wait_for_records(6)
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    assert sorted(history.recorded_sessions()) == sorted(sessions)
    assert len(history.attempts) == 6


async def test_a_failed_recording_is_retried_by_some_replica_and_recorded_once(make_replica, start_history):
    history = await start_history(failures=3)
    options = {"ttl_seconds": 0.3, "end_retry_seconds": 0.05}
    a, b = await make_replica(history.target, **options), await make_replica(history.target, **options)
    sessions = [await new_session(a), await new_session(b)]

    await history.wait_for_records(2, timeout=5.0)
    await asyncio.sleep(0.5)
    assert sorted(history.recorded_sessions()) == sorted(sessions)
    assert len(history.attempts) == 2 + 3


# -- keys


async def test_session_keys_carry_the_session_ttl_and_go_with_it(make_replica, redis_client, key_prefix):
    store = await make_replica()
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    await store.append_events(session_id, entries([1]))
    session_key, log_key, turns_key, order_key, expiries, _, _ = RedisKeys(key_prefix).of_session(session_id)
    for key in (session_key, log_key, turns_key, order_key):
        # The session TTL plus the grace the sweeper needs; never without a TTL.
        assert TTL * 1000 < await redis_client.pttl(key) <= TTL * 1000 + 3_600_000
    info = await store.get_session("alice", session_id)
    assert await redis_client.zscore(expiries, session_id) == pytest.approx(info.expires_at * 1000, abs=1)

    await store.close_session("alice", session_id)
    assert await redis_client.exists(session_key, turns_key, order_key) == 0
    assert await redis_client.zscore(expiries, session_id) is None
    # The log lingers a moment so blocked readers wake and see the session gone.
    assert 0 < await redis_client.pttl(log_key) <= 5000


async def test_daily_counters_live_under_the_prefix_until_utc_midnight(make_replica, redis_client, key_prefix):
    store = await make_replica(quota_limits=QuotaLimits(tokens_per_day=100, audio_seconds_per_day=60))
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1", uses_audio=True)
    await store.end_turn(session_id, "t1", tokens=7, audio_ms=1234)
    keys = RedisKeys(key_prefix)
    assert keys.audio("alice").startswith(key_prefix) and keys.audio("alice").endswith(":quota:audio:alice")
    assert await redis_client.hget(keys.tokens("alice"), "used") == b"7"
    assert await redis_client.hget(keys.audio("alice"), "used") == b"1234"  # milliseconds
    until_midnight_ms = (DAY_SECONDS - time.time() % DAY_SECONDS) * 1000
    for key in (keys.tokens("alice"), keys.audio("alice")):
        assert await redis_client.pttl(key) == pytest.approx(until_midnight_ms, abs=5000)


async def test_a_session_written_before_voice_options_reads_them_as_empty(make_replica, redis_client, key_prefix):
    store = await make_replica()
    info, _ = await store.open_session("alice", "", conversation_id="c", model="", system_prompt="", voice_options=b"v")
    session_key = RedisKeys(key_prefix).of_session(info.session_id)[0]
    await redis_client.hdel(session_key, "voice")  # what an older replica wrote

    assert (await store.get_session("alice", info.session_id)).voice_options == b""
    reopened, _ = await store.open_session("alice", info.session_id, conversation_id="", model="", system_prompt="")
    assert (reopened.voice_options, reopened.conversation_id) == (b"", "c")
    updated = await store.update_session("alice", info.session_id, voice_options=b"\xff\x00")
    assert updated.voice_options == b"\xff\x00"
    assert await redis_client.hget(session_key, "voice") == b"\xff\x00"


async def test_an_expired_session_takes_its_turn_keys_with_it(make_replica, redis_client, key_prefix):
    store = await make_replica(ttl_seconds=0.2)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    session_key, _, turns_key, order_key, *_ = RedisKeys(key_prefix).of_session(session_id)
    assert await redis_client.exists(turns_key, order_key) == 2
    for _ in range(100):  # the sweeper ends it
        if not await redis_client.exists(session_key):
            break
        await asyncio.sleep(0.05)
    assert await redis_client.exists(session_key, turns_key, order_key) == 0


async def test_only_the_newest_turn_states_are_kept(make_replica, redis_client, key_prefix):
    a, b = await make_replica(), await make_replica()
    session_id = await new_session(a)
    turns = [f"t{i}" for i in range(MAX_REMEMBERED_TURNS + 20)]
    for i, turn_id in enumerate(turns):
        await (a, b)[i % 2].begin_turn("alice", session_id, turn_id)
        await (b, a)[i % 2].end_turn(session_id, turn_id)
    await a.begin_turn("alice", session_id, "now")

    _, _, turns_key, order_key, *_ = RedisKeys(key_prefix).of_session(session_id)
    kept = [*turns[-(MAX_REMEMBERED_TURNS - 1) :], "now"]
    assert await redis_client.hlen(turns_key) == MAX_REMEMBERED_TURNS
    assert [turn.decode() for turn in await redis_client.lrange(order_key, 0, -1)] == kept
    states = {turn.decode(): state for turn, state in (await redis_client.hgetall(turns_key)).items()}
    assert states == {**{turn_id: b"ended" for turn_id in kept[:-1]}, "now": b"begun"}


async def test_turn_states_without_an_order_are_adopted_and_the_active_one_kept(
    make_replica, redis_client, key_prefix
):
    """States written by a replica that predates the order (no P turnorder:S): trimmed all the same,
    oldest first, and never the active turn."""
    store = await make_replica(quota_limits=QuotaLimits(tokens_per_day=1000))
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "now")
    _, _, turns_key, order_key, *_ = RedisKeys(key_prefix).of_session(session_id)
    # The active turn listed as the oldest, and 50 states not listed at all.
    listed = ["now", *(f"old{i}" for i in range(MAX_REMEMBERED_TURNS))]
    await redis_client.rpush(order_key, *listed[1:])
    await redis_client.hset(turns_key, mapping={f"old{i}": "ended" for i in range(MAX_REMEMBERED_TURNS + 50)})

    await store.begin_turn("alice", session_id, "now")  # a retry of the active turn
    kept = {"now", *(f"old{i}" for i in range(1, MAX_REMEMBERED_TURNS))}
    assert {turn.decode() for turn in await redis_client.hkeys(turns_key)} == kept
    assert [turn.decode() for turn in await redis_client.lrange(order_key, 0, -1)] == [*listed[2:], "now"]
    assert await redis_client.hget(turns_key, "now") == b"begun"
    await store.end_turn(session_id, "now", tokens=30)
    assert (await store.begin_turn("alice", session_id, "next")).quota.tokens_remaining == 970


async def test_trimming_is_approximate_but_readers_see_exactly_the_newest_events(make_replica, redis_client):
    store = await make_replica(log_max_events=50)
    session_id = await new_session(store)
    for start in range(1, 301, 30):
        await store.append_events(session_id, entries(range(start, start + 30)))
    log_key = RedisKeys(store._keys.prefix).log(session_id)
    assert 50 <= await redis_client.xlen(log_key) < 300  # trimmed, in whole stream nodes

    kept = [event.seq async for batch in store.read_events("alice", session_id, 250, follow=False) for event in batch]
    assert kept == list(range(251, 301))
    with pytest.raises(OutOfRange, match="starts at seq 251"):
        await anext(store.read_events("alice", session_id, 249, follow=False))


async def test_ids_this_store_never_hands_out_are_not_found(make_replica):
    store = await make_replica()
    session_id = await new_session(store)
    for bogus in (f"{session_id}:x", "log:" + session_id, session_id.upper(), ""):
        with pytest.raises(NotFound):
            await store.get_session("alice", bogus or "x")
        with pytest.raises(NotFound):
            await store.append_events(bogus or "x", entries([1]))
        await store.end_turn(bogus, "t1")


# -- cancels across replicas


async def test_a_cancel_asked_on_one_replica_reaches_the_owners_watch_on_another(make_replica):
    """Pub/sub on a single Redis, sharded pub/sub on a cluster: owners' channels on different nodes."""
    a, b = await make_replica(), await make_replica()
    owners = [f"gw-{i}" for i in range(6)]
    watches = [a.watch_cancels(owner) for owner in owners]
    try:
        for watch in watches:
            assert await asyncio.wait_for(anext(watch), 5) is None  # in place
        sessions = [await new_session(a) for _ in owners]
        for owner, session_id in zip(owners, sessions, strict=True):
            await a.begin_turn("alice", session_id, f"turn-{owner}", owner=owner)
        for i, session_id in enumerate(sessions):
            assert await b.request_cancel("alice", session_id, "", interrupt=i % 2 == 1, played_ms=i) == f"turn-gw-{i}"
        for i, (watch, session_id) in enumerate(zip(watches, sessions, strict=True)):
            request = await asyncio.wait_for(anext(watch), PROMPT_SECONDS)
            assert (request.session_id, request.turn_id, request.interrupt, request.played_ms) == (
                session_id, f"turn-gw-{i}", i % 2 == 1, i,
            )  # fmt: skip
    finally:
        for watch in watches:
            await watch.aclose()


# -- one hash slot per script (what lets the same scripts run on a cluster)


async def test_a_sessions_keys_share_one_slot_and_so_do_a_users_and_sessions_spread_over_the_nodes(
    target, make_replica
):
    keys = RedisKeys(target.prefix)
    store = await make_replica()
    sessions = [await new_session(store) for _ in range(30)]
    for session_id in sessions:
        assert len({key_slot(key.encode()) for key in keys.of_session(session_id)}) == 1
    for user_id in ("alice", "a}b{c", "{", "}{"):  # a user id may hold braces
        user_keys = [keys.messages(user_id), keys.tokens(user_id), keys.audio(user_id), keys.counted(user_id)]
        assert len({key_slot(key.encode()) for key in user_keys}) == 1
    if target.cluster:
        holding = 0
        for node in store._redis.get_primaries():
            client = aioredis.Redis(host=node.host, port=node.port)
            try:
                holding += bool([key async for key in client.scan_iter(match=f"{target.prefix}*", count=1000)])
            finally:
                await client.aclose()
        assert holding > 1  # 30 sessions over 16 shards: not all on one master


async def test_a_turn_refused_after_its_message_was_counted_gives_the_message_back(make_replica):
    """BeginTurn counts the message, then begins the turn; another turn beginning in between refuses it,
    and its message is not counted."""
    limits = QuotaLimits(messages_per_minute=5)
    a, b = await make_replica(quota_limits=limits), await make_replica(quota_limits=limits)
    session_id = await new_session(a)
    begin = a._begin
    raced = []

    async def another_turn_begins_in_between(*args, **options):
        reply = await begin(*args, **options)
        if reply[0] == b"NEEDS_QUOTA" and not raced:
            raced.append(await b.begin_turn("alice", session_id, "theirs"))
        return reply

    a._begin = another_turn_begins_in_between
    with pytest.raises(FailedPrecondition):
        await a.begin_turn("alice", session_id, "mine")
    assert raced[0].quota.messages_remaining == 4
    assert (await b.begin_turn("alice", session_id, "theirs")).quota.messages_remaining == 4  # a renewal
    assert (await a.get_session("alice", session_id)).active_turn_id == "theirs"


async def test_a_begun_turn_whose_reply_was_lost_is_counted_once_when_retried(make_replica):
    limits = QuotaLimits(messages_per_minute=5)
    store = await make_replica(quota_limits=limits)
    session_id = await new_session(store)
    begin = store._begin

    async def reply_lost(*args, quota_held: bool, **options):
        reply = await begin(*args, quota_held=quota_held, **options)
        if quota_held:
            store._begin = begin
            raise redis.exceptions.ConnectionError("connection lost")
        return reply

    store._begin = reply_lost
    with pytest.raises(Unavailable):
        await store.begin_turn("alice", session_id, "t1")
    started = await store.begin_turn("alice", session_id, "t1")  # the gateway's retry
    assert started.quota.messages_remaining == 4
    assert (await store.get_session("alice", session_id)).active_turn_id == "t1"


@pytest.mark.parametrize("landed", [False, True], ids=["usage-not-added", "usage-added-reply-lost"])
async def test_usage_lost_after_the_turn_ended_is_counted_once_by_the_retry(make_replica, landed):
    """EndTurn ends the turn, then adds its usage to the user's quota (another slot): a failure in between
    is made good by the retry, and no retry counts twice."""
    limits = QuotaLimits(tokens_per_day=100)
    store = await make_replica(quota_limits=limits)
    session_id = await new_session(store)
    await store.begin_turn("alice", session_id, "t1")
    add_usage = store._scripts.add_usage

    async def failing_add_usage(**options):
        store._scripts.add_usage = add_usage
        if landed:
            await add_usage(**options)
        raise redis.exceptions.ConnectionError("connection lost")

    store._scripts.add_usage = failing_add_usage
    with pytest.raises(Unavailable):
        await store.end_turn(session_id, "t1", tokens=60)
    assert (await store.get_session("alice", session_id)).active_turn_id == ""
    with pytest.raises(FailedPrecondition):
        await store.begin_turn("alice", session_id, "t1")  # ended, if not yet counted

    await store.end_turn(session_id, "t1", tokens=60)  # the gateway's retry
    await store.end_turn(session_id, "t1", tokens=60)  # and one more
    assert (await store.begin_turn("alice", session_id, "t2")).quota.tokens_remaining == 40


# -- Redis down


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
async def test_an_unreachable_redis_is_unavailable_and_not_ready(cluster):
    store = RedisSessionStore(
        connect(f"redis://127.0.0.1:{free_port()}/0", cluster=cluster),
        key_prefix="duplex-test:",
        ttl_seconds=TTL,
        log_max_events=10,
        turn_lease_seconds=1.0,
    )
    try:
        assert await store.is_ready() is False
        with pytest.raises(Unavailable):
            await store.get_session("alice", "0" * 32)
        with pytest.raises(Unavailable):
            await anext(store.read_events("alice", "0" * 32, 0, follow=True))
        with pytest.raises(Unavailable):
            await anext(store.watch_cancels("gw-a"))
        with pytest.raises(Unavailable):
            await store.append_event_batches([EventBatch("0" * 32, entries([1])), EventBatch("1" * 32, entries([1]))])
    finally:
        await store.close()


def test_redact_url_hides_passwords_only():
    assert redact_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact_url("rediss://app:s3cret@db:6380/1?ssl_cert_reqs=none") == (
        "rediss://app:***@db:6380/1?ssl_cert_reqs=none"
    )
    assert redact_url("redis://db:6379/0?password=s3cret") == "redis://db:6379/0?password=***"
    assert redact_url("redis://db:6379/0") == "redis://db:6379/0"
