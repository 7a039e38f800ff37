"""RedisSessionStore: the SessionStore protocol on Redis (redis-py asyncio), shared by many replicas.

Same semantics as MemorySessionStore; the key layout and the atomic scripts are in redis_scripts.py.
Every change is one Lua script, so replicas never see half of one. Followers block in XREAD on the
session's stream (bounded, woken by appends and by control entries for EndTurn / close / expiry) and
re-read a consistent snapshot after every wake, so they never miss or repeat an event.

The client is a redis.asyncio.Redis or a RedisCluster: every script touches one hash slot (a session's
shard, or one user's quota), so the same scripts serve both. On a cluster, work spanning several shards
(appending for many sessions, sweeping) is one script per shard, and cancels travel over sharded pub/sub.
"""

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from duplex.common.errors import DuplexError, Unavailable
from session_service.quota import (
    NO_LIMITS,
    QuotaLimits,
    QuotaStatus,
    audio_exhausted,
    messages_exhausted,
    tokens_exhausted,
)
from session_service.redis_scripts import (
    ACK_ENDED,
    ADD_USAGE,
    APPEND,
    APPEND_BATCHES,
    BEGIN_TURN,
    CLAIM_ENDED,
    CLOSE,
    END_TURN,
    GET,
    GIVE_BACK_QUOTA,
    NEXT_ENDED_DUE,
    OPEN_NEW,
    PRELUDE,
    READ,
    REOPEN,
    REQUEST_CANCEL,
    RETRY_ENDED,
    SWEEP_EXPIRED,
    TAKE_QUOTA,
    TURN_COUNTED,
    UPDATE,
)
from session_service.session_end import (
    RECORD_TIMEOUT_SECONDS,
    EndedSession,
    Housekeeper,
    SessionEndRecorder,
    retry_delay,
    try_record,
)
from session_service.store import (
    DEFAULT_END_RETRY_SECONDS,
    MAX_EVENTS_PER_BATCH,
    MAX_REMEMBERED_TURNS,
    AppendOutcome,
    CancelRequest,
    EventBatch,
    LogEntry,
    SessionInfo,
    TurnStart,
    gap_error,
    no_events_error,
    session_not_found,
    sweep_interval,
    trimmed_error,
    turn_ended_error,
    turn_running_error,
)

log = logging.getLogger(__name__)

# Ids this store hands out; anything else cannot name one of its sessions (and cannot be abused to
# build another key's name).
SESSION_ID = re.compile(r"[0-9a-f]{32}")
# A follower blocks at most this long before re-checking the session; wakes normally come sooner, from
# the stream itself. The socket timeout must be longer, or a blocked XREAD would look like a dead Redis.
MAX_FOLLOW_BLOCK_MS = 2000
SOCKET_TIMEOUT_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 2.0
# Redis' own key TTL trails the logical expiry by this much, so a sweeper always finds what it must record.
EXPIRY_GRACE_MS = 3_600_000
SWEEP_BATCH = 100
CLAIM_BATCH = 50
# How long a replica holds an end record it is delivering before another may try it.
CLAIM_LEASE_MS = int((RECORD_TIMEOUT_SECONDS + 5) * 1000)
# A session's shard is the first character of its id: its keys' hash tag (redis_scripts.py).
SHARDS = "0123456789abcdef"
# On a cluster a follower's blocked XREAD holds a node connection; the pool must not cap followers low.
CLUSTER_MAX_CONNECTIONS_PER_NODE = 100_000

P = ParamSpec("P")
R = TypeVar("R")


RedisClient = aioredis.Redis | RedisCluster


def connect(url: str, *, cluster: bool = False) -> RedisClient:
    """One client over one connection pool (a cluster client: one pool per node, the nodes found from the
    one in the URL). No automatic retries: a script retried after a lost reply could apply twice; callers
    get UNAVAILABLE and decide. (A cluster's MOVED / ASK redirections are still followed: the command
    did not run.)"""
    options = {
        "decode_responses": False,  # payloads are opaque bytes
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:
        return RedisCluster.from_url(url, max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE, **options)
    return aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(url, **options))


def redact_url(url: str) -> str:
    """The URL without its password (in the userinfo or a `password=` query parameter), for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = urlencode(
        [(key, "***" if key == "password" else value) for key, value in parse_qsl(parts.query)], safe="*"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# What a Redis (or a cluster, or one of its nodes) that is down or failing over looks like. A cluster with
# no reachable node raises RedisClusterException, which is not a RedisError.
_REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.RedisClusterException,
)


@contextlib.contextmanager
def _unavailable_when_redis_is() -> Iterator[None]:
    try:
        yield
    except _REDIS_DOWN as error:
        raise Unavailable("session store is unavailable") from error


def _redis_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with _unavailable_when_redis_is():
            return await method(*args, **kwargs)

    return call


def _text(value: bytes) -> str:
    return value.decode()


def shard_of(session_id: str) -> str:
    return session_id[0]


@dataclass(frozen=True)
class RedisKeys:
    """Key names; must match keys_of() in redis_scripts.PRELUDE. A session's keys and its shard's index
    share the tag {<shard>}; a user's quota keys share {u:<digest of the user id>}."""

    prefix: str

    def _of_shard(self, shard: str) -> str:
        return f"{self.prefix}{{{shard}}}:"

    def of_session(self, session_id: str) -> list[str]:
        """The declared keys of every session script, in declared_keys() order."""
        p = self._of_shard(shard_of(session_id))
        return [
            f"{p}session:{session_id}",
            f"{p}log:{session_id}",
            f"{p}turns:{session_id}",
            f"{p}turnorder:{session_id}",
            f"{p}expiries",
            f"{p}ended",
            f"{p}ended:{session_id}",
        ]

    def log(self, session_id: str) -> str:
        return f"{self._of_shard(shard_of(session_id))}log:{session_id}"

    def expiries(self, shard: str) -> str:
        return f"{self._of_shard(shard)}expiries"

    def ended(self, shard: str) -> str:
        return f"{self._of_shard(shard)}ended"

    def ended_record(self, session_id: str) -> str:
        return f"{self._of_shard(shard_of(session_id))}ended:{session_id}"

    def _of_user(self, user_id: str) -> str:
        digest = hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()
        return f"{self.prefix}{{u:{digest}}}:quota:"

    def messages(self, user_id: str) -> str:
        return f"{self._of_user(user_id)}messages:{user_id}"

    def tokens(self, user_id: str) -> str:
        return f"{self._of_user(user_id)}tokens:{user_id}"

    def audio(self, user_id: str) -> str:
        return f"{self._of_user(user_id)}audio:{user_id}"

    def counted(self, user_id: str) -> str:
        return f"{self._of_user(user_id)}counted:{user_id}"

    def cancels(self, owner: str) -> str:
        return f"{self.prefix}cancels:{owner}"


class _Scripts:
    def __init__(self, client: RedisClient) -> None:
        def register(body: str):
            return client.register_script(PRELUDE + body)

        self.open_new = register(OPEN_NEW)
        self.reopen = register(REOPEN)
        self.get = register(GET)
        self.update = register(UPDATE)
        self.close = register(CLOSE)
        self.begin_turn = register(BEGIN_TURN)
        self.take_quota = register(TAKE_QUOTA)
        self.give_back_quota = register(GIVE_BACK_QUOTA)
        self.end_turn = register(END_TURN)
        self.add_usage = register(ADD_USAGE)
        self.turn_counted = register(TURN_COUNTED)
        self.request_cancel = register(REQUEST_CANCEL)
        self.append = register(APPEND)
        self.append_batches = register(APPEND_BATCHES)
        self.read = register(READ)
        self.sweep_expired = register(SWEEP_EXPIRED)
        self.claim_ended = register(CLAIM_ENDED)
        self.retry_ended = register(RETRY_ENDED)
        self.ack_ended = register(ACK_ENDED)
        self.next_ended_due = register(NEXT_ENDED_DUE)


@dataclass(frozen=True)
class _Snapshot:
    """One atomic look at a session for a reader."""

    events: list[LogEntry]
    running: bool
    lease_left_ms: int
    last_stream_id: bytes


@dataclass(frozen=True)
class _ClaimedEnd:
    ended: EndedSession
    attempts: int


def _session_info(session_id: str, reply: list[bytes]) -> SessionInfo:
    _, now, user, conv, model, prompt, persona, created, expires, last_seq, turn, owner, lease, voice = reply
    running = bool(turn) and int(lease) > int(now)
    return SessionInfo(
        session_id=session_id,
        user_id=_text(user),
        conversation_id=_text(conv),
        model=_text(model),
        system_prompt=_text(prompt),
        persona=_text(persona),
        created_at=int(created) / 1000,
        expires_at=int(expires) / 1000,
        last_seq=int(last_seq),
        active_turn_id=_text(turn) if running else "",
        active_turn_owner=_text(owner) if running else "",
        voice_options=voice,  # opaque bytes, never decoded
    )


def _remaining(value: bytes) -> int | None:
    number = int(value)
    return None if number < 0 else number


def _snapshot(reply: list[bytes]) -> _Snapshot:
    _, running, lease_left, last_id, count, *flat = reply
    events = [
        LogEntry(seq=int(flat[i]), turn_id=_text(flat[i + 1]), payload=flat[i + 2], terminal=flat[i + 3] == b"1")
        for i in range(0, 4 * int(count), 4)
    ]
    return _Snapshot(events, running == b"1", int(lease_left), last_id)


def _event_args(events: Sequence[LogEntry]) -> list[str | int | bytes]:
    """The (seq, turn, payload, terminal) script arguments of each event, flattened."""
    args: list[str | int | bytes] = []
    for event in events:
        args += [event.seq, event.turn_id, event.payload, "1" if event.terminal else "0"]
    return args


def _append_outcome(session_id: str, reply: list[bytes]) -> AppendOutcome:
    status = reply[0]
    if status == b"NOT_FOUND":
        return session_not_found(session_id)
    if status == b"EMPTY":
        return no_events_error(int(reply[1]))
    if status == b"GAP":
        return gap_error(int(reply[1]), int(reply[2]))
    if status == b"UNAVAILABLE":  # not a script's answer: its cluster node did not answer
        return Unavailable("session store is unavailable")
    return int(reply[1])


def _cancel_request(session_id: str, turn_id: str, recorded: bytes) -> CancelRequest | None:
    """The cancel field of a session ("<interrupt>:<played_ms>"), for its turn; None when empty."""
    if not recorded:
        return None
    interrupt, played_ms = recorded.split(b":")
    return CancelRequest(session_id, turn_id, interrupt == b"1", int(played_ms))


def _published_cancel(message: bytes) -> CancelRequest:
    session_id, turn_id, interrupt, played_ms = message.split(b" ")
    return CancelRequest(_text(session_id), _text(turn_id), interrupt == b"1", int(played_ms))


def _claimed_ends(reply: list[bytes]) -> list[_ClaimedEnd]:
    claimed = []
    for i in range(0, len(reply), 6):
        session_id, user, conv, created, ended, attempts = reply[i : i + 6]
        ended_session = EndedSession(
            user_id=_text(user),
            session_id=_text(session_id),
            conversation_id=_text(conv),
            started_at=int(created) / 1000,
            ended_at=int(ended) / 1000,
        )
        claimed.append(_ClaimedEnd(ended_session, int(attempts)))
    return claimed


class RedisSessionStore:
    """Sessions in Redis, shared by every replica pointing at the same Redis and key prefix."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        ttl_seconds: float,
        log_max_events: int,
        turn_lease_seconds: float,
        quota_limits: QuotaLimits = NO_LIMITS,
        recorder: SessionEndRecorder | None = None,
        end_retry_seconds: float = DEFAULT_END_RETRY_SECONDS,
    ) -> None:
        if log_max_events < 1:
            raise ValueError("log_max_events must be at least 1")
        self._redis = client
        self._cluster = isinstance(client, RedisCluster)
        self._keys = RedisKeys(key_prefix)
        self._scripts = _Scripts(client)
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._lease_ms = max(1, int(turn_lease_seconds * 1000))
        self._log_max_events = log_max_events
        self._limits = quota_limits
        self._recorder = recorder
        self._end_retry = end_retry_seconds
        self._closed = asyncio.Event()
        self._housekeeper = Housekeeper("session-sweeper", self._housekeep, sweep_interval(ttl_seconds))

    # -- lifecycle

    async def start(self) -> None:
        # Redis may not answer yet (health says so); the sweeper keeps trying on its own.
        self._housekeeper.start()

    async def close(self) -> None:
        self._closed.set()  # ends followers
        await self._housekeeper.stop()
        await self._redis.aclose()

    async def is_ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), PING_TIMEOUT_SECONDS))
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, TimeoutError):
            return False

    # -- sessions

    @_redis_call
    async def open_session(
        self,
        user_id: str,
        session_id: str,
        *,
        conversation_id: str,
        model: str,
        system_prompt: str,
        persona: str = "",
        voice_options: bytes = b"",
    ) -> tuple[SessionInfo, bool]:
        if not session_id:
            session_id = uuid.uuid4().hex
            args = [
                session_id, user_id, conversation_id, model, system_prompt, persona, self._ttl_ms, EXPIRY_GRACE_MS,
                voice_options,
            ]  # fmt: skip
            reply = await self._scripts.open_new(keys=self._keys.of_session(session_id), args=args)
            log.info("session %s opened for user %s", session_id, user_id)
            return _session_info(session_id, reply), False
        self._require_session_id(session_id)
        args = [session_id, user_id, model, system_prompt, persona, self._ttl_ms, EXPIRY_GRACE_MS]
        reply = await self._scripts.reopen(keys=self._keys.of_session(session_id), args=args)
        self._require_found(reply, session_id)
        return _session_info(session_id, reply), True

    @_redis_call
    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        self._require_session_id(session_id)
        reply = await self._scripts.get(keys=self._keys.of_session(session_id), args=[user_id])
        self._require_found(reply, session_id)
        return _session_info(session_id, reply)

    @_redis_call
    async def update_session(self, user_id: str, session_id: str, *, voice_options: bytes) -> SessionInfo:
        self._require_session_id(session_id)
        args = [session_id, user_id, voice_options, self._ttl_ms, EXPIRY_GRACE_MS]
        reply = await self._scripts.update(keys=self._keys.of_session(session_id), args=args)
        self._require_found(reply, session_id)
        return _session_info(session_id, reply)

    @_redis_call
    async def close_session(self, user_id: str, session_id: str) -> None:
        self._require_session_id(session_id)
        record = "1" if self._recorder is not None else "0"
        reply = await self._scripts.close(keys=self._keys.of_session(session_id), args=[session_id, user_id, record])
        self._require_found(reply, session_id)
        log.info("session %s closed", session_id)
        self._housekeeper.poke()  # record the end now, not at the next sweep

    # -- turns

    @_redis_call
    async def begin_turn(
        self, user_id: str, session_id: str, turn_id: str, *, owner: str = "", uses_audio: bool = False
    ) -> TurnStart:
        """A session's turn and its user's quota live in different hash slots (a cluster cannot change
        both in one script), so a new turn takes three atomic steps, in this order:

        1. BEGIN_TURN checks the session (found, no other turn running, this one not ended) and changes
           nothing: NEEDS_QUOTA. (A retry of the session's own turn renews its lease here: one round trip,
           no quota counted.)
        2. TAKE_QUOTA checks the user's quotas and counts the turn's message, keyed by session:turn, so a
           retry of the same turn is never counted twice.
        3. BEGIN_TURN again, quota held: the session's checks again (another turn may have begun
           meanwhile), then the turn begins.

        Quota first, then the turn, because the other order's failure is worse: a turn begun whose quota
        then fails (refused, or the quota's node down) must be undone, and if that undo is lost the
        session holds a turn nobody runs, refusing every message as busy until its lease runs out. Here a
        failure between 2 and 3 leaves at worst one message counted in the one-minute window for a turn
        that did not begin: it ages out within a minute, and the gateway's retry of the same turn reuses
        it. When 3 refuses (another turn won the race, the session went), the message is given back;
        when 3's reply is lost we cannot know whether the turn began, so the message stays counted
        (counting a turn that did begin is the one thing never skipped). Tokens and audio are counted
        only at EndTurn (end_turn), never here."""
        self._require_session_id(session_id)
        limited = any((self._limits.messages_per_minute, self._limits.tokens_per_day, self._limits.audio_ms_per_day))
        reply = await self._begin(user_id, session_id, turn_id, owner, quota_held=not limited)
        if reply[0] == b"NEEDS_QUOTA":
            quota, fresh = await self._quota(user_id, session_id, turn_id, uses_audio, take=True)
            reply = await self._begin(user_id, session_id, turn_id, owner, quota_held=True)
            if fresh and reply[0] in (b"BUSY", b"NOT_FOUND"):  # not begun: no message sent
                member = f"{session_id}:{turn_id}"
                await self._scripts.give_back_quota(keys=[self._keys.messages(user_id)], args=[member])
            self._raise_if_refused(reply, session_id, turn_id)
        else:
            self._raise_if_refused(reply, session_id, turn_id)
            # Without limits this began a new turn; with them it renewed the session's own.
            quota = QuotaStatus(None, None, None)
            if limited:
                quota, _ = await self._quota(user_id, session_id, turn_id, uses_audio, take=False)
        _, last_seq, taken_over, cancel = reply
        if taken_over:
            log.warning(
                "session %s: turn %s takes over turn %s whose lease expired", session_id, turn_id, _text(taken_over)
            )
        return TurnStart(int(last_seq), quota, _text(taken_over), _cancel_request(session_id, turn_id, cancel))

    async def _begin(self, user_id: str, session_id: str, turn_id: str, owner: str, *, quota_held: bool) -> list:
        args = [
            session_id, user_id, turn_id, owner, self._ttl_ms, EXPIRY_GRACE_MS, self._lease_ms, MAX_REMEMBERED_TURNS,
            "1" if quota_held else "0",
        ]  # fmt: skip
        return await self._scripts.begin_turn(keys=self._keys.of_session(session_id), args=args)

    async def _quota(
        self, user_id: str, session_id: str, turn_id: str, uses_audio: bool, *, take: bool
    ) -> tuple[QuotaStatus, bool]:
        """What is left of the user's quotas, after counting the turn's message when `take` (refused:
        ResourceExhausted); and whether this call counted it."""
        keys = [self._keys.messages(user_id), self._keys.tokens(user_id), self._keys.audio(user_id)]
        args = [
            f"{session_id}:{turn_id}",
            self._limits.messages_per_minute,
            self._limits.tokens_per_day,
            self._limits.audio_ms_per_day,
            "1" if uses_audio else "0",
            "1" if take else "0",
        ]
        reply = await self._scripts.take_quota(keys=keys, args=args)
        self._raise_if_refused(reply, session_id, turn_id)
        _, messages_left, tokens_left, audio_left, fresh = reply
        return QuotaStatus(_remaining(messages_left), _remaining(tokens_left), _remaining(audio_left)), fresh == b"1"

    def _raise_if_refused(self, reply: list[bytes], session_id: str, turn_id: str) -> None:
        status = reply[0]
        if status == b"OK":
            return
        if status == b"NOT_FOUND":
            raise session_not_found(session_id)
        if status == b"BUSY":
            raise turn_running_error()
        if status == b"TURN_ENDED":
            raise turn_ended_error(turn_id)
        if status == b"TOKENS":
            raise tokens_exhausted(self._limits.tokens_per_day, int(reply[1]) / 1000)
        if status == b"AUDIO":
            raise audio_exhausted(self._limits.audio_seconds_per_day, int(reply[1]) / 1000)
        if status == b"MESSAGES":
            raise messages_exhausted(self._limits.messages_per_minute, int(reply[1]) / 1000)
        raise RuntimeError(f"unexpected begin_turn reply {status!r}")

    @_redis_call
    async def end_turn(
        self, session_id: str, turn_id: str, *, tokens: int = 0, audio_ms: int = 0, unanswered: bool = False
    ) -> None:
        """Three atomic steps when the turn used anything (session state and the user's quota are in
        different hash slots): END_TURN ends the turn and marks it "counting"; ADD_USAGE adds its usage
        to the user's day once (keyed by session:turn, so a repeat adds nothing); TURN_COUNTED marks it
        "ended". A failure after the first step leaves the turn "counting": a retried EndTurn (the same
        call again) counts it then, and never twice."""
        if not SESSION_ID.fullmatch(session_id):
            return
        has_usage = tokens > 0 or audio_ms > 0
        args = [session_id, turn_id, self._ttl_ms, EXPIRY_GRACE_MS, "1" if has_usage else "0"]
        reply = await self._scripts.end_turn(keys=self._keys.of_session(session_id), args=args)
        if reply[0] != b"OK":
            return
        user_id = _text(reply[2])
        if unanswered:  # its message, counted by BeginTurn under session:turn, is given back (once: a set)
            await self._scripts.give_back_quota(keys=[self._keys.messages(user_id)], args=[f"{session_id}:{turn_id}"])
        if reply[1] != b"1":
            return
        keys = [self._keys.tokens(user_id), self._keys.audio(user_id), self._keys.counted(user_id)]
        await self._scripts.add_usage(keys=keys, args=[f"{session_id}:{turn_id}", tokens, audio_ms])
        await self._scripts.turn_counted(keys=self._keys.of_session(session_id), args=[turn_id])

    @_redis_call
    async def request_cancel(
        self, user_id: str, session_id: str, turn_id: str, *, interrupt: bool = False, played_ms: int = 0
    ) -> str:
        self._require_session_id(session_id)
        flag = "1" if interrupt else "0"
        args = [session_id, user_id, turn_id, flag, played_ms]
        reply = await self._scripts.request_cancel(keys=self._keys.of_session(session_id), args=args)
        self._require_found(reply, session_id)
        if reply[0] == b"NONE":
            return ""
        running, owner = _text(reply[1]), _text(reply[2])
        # Recorded first, so an owner whose watch is down still sees it when it renews the lease.
        message = f"{session_id} {running} {flag} {played_ms}"
        if self._cluster:  # sharded: only the channel's node carries it, not every node of the cluster
            await self._redis.spublish(self._keys.cancels(owner), message)
        else:
            await self._redis.publish(self._keys.cancels(owner), message)
        return running

    async def watch_cancels(self, owner: str) -> AsyncIterator[CancelRequest | None]:
        channel = self._keys.cancels(owner)
        with _unavailable_when_redis_is():
            pubsub = self._redis.pubsub()
            try:
                if self._cluster:  # sharded pub/sub: on the node that serves the channel's slot
                    await self._redis.initialize()  # the slot map (a first command would have fetched it)
                    await pubsub.ssubscribe(channel)
                    receive = functools.partial(pubsub.get_sharded_message, timeout=None)
                else:
                    await pubsub.subscribe(channel)
                    receive = functools.partial(pubsub.get_message, timeout=None)
                while True:
                    message = await receive()
                    if message is None:
                        continue
                    if message["type"] in ("subscribe", "ssubscribe"):
                        yield None  # Redis confirmed it: every publish from now on reaches us
                    elif message["type"] in ("message", "smessage"):
                        yield _published_cancel(message["data"])
            finally:
                await pubsub.aclose()

    # -- the event log

    @_redis_call
    async def append_events(self, session_id: str, events: Sequence[LogEntry]) -> int:
        self._require_session_id(session_id)
        args = [session_id, self._ttl_ms, EXPIRY_GRACE_MS, self._lease_ms, self._log_max_events, *_event_args(events)]
        reply = await self._scripts.append(keys=self._keys.of_session(session_id), args=args)
        outcome = _append_outcome(session_id, reply)
        if isinstance(outcome, DuplexError):
            raise outcome
        return outcome

    @_redis_call
    async def append_event_batches(self, batches: Sequence[EventBatch]) -> list[AppendOutcome]:
        # An id this store never hands out names no session: refused without asking Redis.
        known = [SESSION_ID.fullmatch(batch.session_id) is not None for batch in batches]
        to_send = [batch for batch, ok in zip(batches, known, strict=True) if ok]
        replies = iter(await self._append_batches(to_send) if to_send else [])
        return [
            _append_outcome(batch.session_id, next(replies)) if ok else session_not_found(batch.session_id)
            for batch, ok in zip(batches, known, strict=True)
        ]

    async def _append_batches(self, batches: Sequence[EventBatch]) -> list[list[bytes]]:
        """One script for every batch: one round trip however many sessions (its keys span them all). On a
        cluster one script per shard (a script's keys share a slot), all at once; a shard whose Redis
        node fails refuses its own batches UNAVAILABLE, the others land (all failing: the call is)."""
        if not self._cluster:
            return await self._append_in_one_slot(batches)
        by_shard: dict[str, list[int]] = {}
        for i, batch in enumerate(batches):
            by_shard.setdefault(shard_of(batch.session_id), []).append(i)
        groups = list(by_shard.values())
        replies = await asyncio.gather(
            *(self._append_in_one_slot([batches[i] for i in group]) for group in groups), return_exceptions=True
        )
        down = [reply for reply in replies if isinstance(reply, _REDIS_DOWN)]
        if len(down) == len(replies):
            raise down[0]  # as on a single Redis: the whole call is UNAVAILABLE
        outcomes: list[list[bytes]] = [[]] * len(batches)
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, _REDIS_DOWN):
                reply = [[b"UNAVAILABLE"]] * len(group)
            elif isinstance(reply, BaseException):
                raise reply
            for i, one in zip(group, reply, strict=True):
                outcomes[i] = one
        return outcomes

    async def _append_in_one_slot(self, batches: Sequence[EventBatch]) -> list[list[bytes]]:
        keys: list[str] = []
        args: list[str | int | bytes] = [self._ttl_ms, EXPIRY_GRACE_MS, self._lease_ms, self._log_max_events]
        for batch in batches:
            keys += self._keys.of_session(batch.session_id)
            args += [batch.session_id, len(batch.events), *_event_args(batch.events)]
        return await self._scripts.append_batches(keys=keys, args=args)

    async def read_events(
        self, user_id: str, session_id: str, after_seq: int, *, follow: bool
    ) -> AsyncIterator[list[LogEntry]]:
        self._require_session_id(session_id)
        cursor = after_seq
        first_pass = True
        with _unavailable_when_redis_is():
            while not self._closed.is_set():
                snapshot = await self._read(user_id, session_id, cursor, touch=first_pass)
                if snapshot is None:
                    if first_pass:
                        raise session_not_found(session_id)
                    return  # closed or expired while we were reading: the stream simply ends
                first_pass = False
                if snapshot.events:
                    cursor = snapshot.events[-1].seq
                    yield snapshot.events
                    continue
                if not follow or not snapshot.running:
                    return
                await self._wait_for_entries(session_id, snapshot)

    async def _read(self, user_id: str, session_id: str, after_seq: int, *, touch: bool) -> _Snapshot | None:
        args = [
            session_id,
            user_id,
            after_seq,
            MAX_EVENTS_PER_BATCH,
            "1" if touch else "0",
            self._ttl_ms,
            EXPIRY_GRACE_MS,
            self._log_max_events,
        ]
        reply = await self._scripts.read(keys=self._keys.of_session(session_id), args=args)
        if reply[0] == b"NOT_FOUND":
            return None
        if reply[0] == b"TRIMMED":
            raise trimmed_error(after_seq, int(reply[1]))
        return _snapshot(reply)

    async def _wait_for_entries(self, session_id: str, snapshot: _Snapshot) -> None:
        """Block until the stream grows past the snapshot (an event or a control entry), the lease may
        have run out, the bound passes, or the store closes. Anything added after the snapshot wakes us:
        XREAD starts from the snapshot's last id, never from "now"."""
        block_ms = max(1, min(snapshot.lease_left_ms, MAX_FOLLOW_BLOCK_MS))
        xread = asyncio.ensure_future(
            self._redis.xread({self._keys.log(session_id): snapshot.last_stream_id}, count=1, block=block_ms)
        )
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({xread, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            xread.cancel()
            closing.cancel()
        if xread.done() and not xread.cancelled():
            xread.result()  # re-raise a Redis failure

    # -- expiry and end records

    def _shard_groups(self) -> list[list[str]]:
        """Shards one script may span: all on a single Redis, one at a time on a cluster."""
        return [[shard] for shard in SHARDS] if self._cluster else [list(SHARDS)]

    async def _housekeep(self) -> float | None:
        with _unavailable_when_redis_is():
            record = "1" if self._recorder is not None else "0"
            more_expired = False
            for shards in self._shard_groups():
                keys = [key for shard in shards for key in (self._keys.expiries(shard), self._keys.ended(shard))]
                claimed = await self._scripts.sweep_expired(keys=keys, args=[self._keys.prefix, SWEEP_BATCH, record])
                if claimed:
                    log.info("%d expired session(s) ended", claimed)
                more_expired = more_expired or claimed >= SWEEP_BATCH
            if self._recorder is None:
                return 0.0 if more_expired else None
            delivered_all = True
            for shards in self._shard_groups():
                delivered_all = await self._record_due_ends(self._recorder, shards) and delivered_all
            if more_expired or not delivered_all:
                return 0.0
            due = [
                await self._scripts.next_ended_due(keys=[self._keys.ended(shard) for shard in shards])
                for shards in self._shard_groups()
            ]
        waiting = [ms for ms in due if ms >= 0]
        return min(waiting) / 1000 if waiting else None

    async def _record_due_ends(self, recorder: SessionEndRecorder, shards: list[str]) -> bool:
        """Deliver claimed end records; False when the batch was full (more may be due)."""
        reply = await self._scripts.claim_ended(
            keys=[self._keys.ended(shard) for shard in shards], args=[self._keys.prefix, CLAIM_BATCH, CLAIM_LEASE_MS]
        )
        claimed = _claimed_ends(reply)
        await asyncio.gather(*(self._deliver(recorder, end) for end in claimed))
        return len(claimed) < CLAIM_BATCH

    async def _deliver(self, recorder: SessionEndRecorder, claimed: _ClaimedEnd) -> None:
        session_id = claimed.ended.session_id
        ended = self._keys.ended(shard_of(session_id))
        if await try_record(recorder, claimed.ended, claimed.attempts):
            keys = [ended, self._keys.ended_record(session_id)]
            await self._scripts.ack_ended(keys=keys, args=[session_id])
            return
        delay_ms = int(retry_delay(claimed.attempts, self._end_retry) * 1000)
        await self._scripts.retry_ended(keys=[ended], args=[session_id, delay_ms])

    # -- helpers

    @staticmethod
    def _require_session_id(session_id: str) -> None:
        if not SESSION_ID.fullmatch(session_id):
            raise session_not_found(session_id)

    @staticmethod
    def _require_found(reply: list[bytes], session_id: str) -> None:
        if reply[0] == b"NOT_FOUND":
            raise session_not_found(session_id)
