"""RedisSessionStore: the SessionStore protocol on Redis (redis-py asyncio), shared by many replicas.

Same semantics as MemorySessionStore; the key layout and the atomic scripts are in redis_scripts.py.
Every change is one Lua script, so replicas never see half of one. Followers block in XREAD on the
session's stream (bounded, woken by appends and by control entries for EndTurn / close / expiry) and
re-read a consistent snapshot after every wake, so they never miss or repeat an event.

Not for Redis Cluster: scripts touch a session's keys together with per-user and global keys.
"""

import asyncio
import contextlib
import functools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
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
    APPEND,
    APPEND_BATCHES,
    BEGIN_TURN,
    CLAIM_ENDED,
    CLOSE,
    END_TURN,
    GET,
    NEXT_ENDED_DUE,
    OPEN_NEW,
    PRELUDE,
    READ,
    REOPEN,
    REQUEST_CANCEL,
    RETRY_ENDED,
    SWEEP_EXPIRED,
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

P = ParamSpec("P")
R = TypeVar("R")


def connect(url: str) -> aioredis.Redis:
    """One client over one connection pool. No automatic retries: a script retried after a lost reply
    could apply twice; callers get UNAVAILABLE and decide."""
    pool = aioredis.ConnectionPool.from_url(
        url,
        decode_responses=False,  # payloads are opaque bytes
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


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


@contextlib.contextmanager
def _unavailable_when_redis_is() -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        raise Unavailable("session store is unavailable") from error


def _redis_call(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with _unavailable_when_redis_is():
            return await method(*args, **kwargs)

    return call


def _text(value: bytes) -> str:
    return value.decode()


@dataclass(frozen=True)
class RedisKeys:
    """Key names; must match keys_of() in redis_scripts.PRELUDE."""

    prefix: str

    def of_session(self, session_id: str) -> list[str]:
        """The declared keys of every session script, in declared_keys() order."""
        p = self.prefix
        return [
            f"{p}session:{session_id}",
            f"{p}log:{session_id}",
            f"{p}turns:{session_id}",
            f"{p}turnorder:{session_id}",
            self.expiries,
            self.ended,
            f"{p}ended:{session_id}",
        ]

    def log(self, session_id: str) -> str:
        return f"{self.prefix}log:{session_id}"

    @property
    def expiries(self) -> str:
        return f"{self.prefix}expiries"

    @property
    def ended(self) -> str:
        return f"{self.prefix}ended"

    def ended_record(self, session_id: str) -> str:
        return f"{self.prefix}ended:{session_id}"

    def messages(self, user_id: str) -> str:
        return f"{self.prefix}quota:messages:{user_id}"

    def tokens(self, user_id: str) -> str:
        return f"{self.prefix}quota:tokens:{user_id}"

    def audio(self, user_id: str) -> str:
        return f"{self.prefix}quota:audio:{user_id}"

    def cancels(self, owner: str) -> str:
        return f"{self.prefix}cancels:{owner}"


class _Scripts:
    def __init__(self, client: aioredis.Redis) -> None:
        def register(body: str):
            return client.register_script(PRELUDE + body)

        self.open_new = register(OPEN_NEW)
        self.reopen = register(REOPEN)
        self.get = register(GET)
        self.update = register(UPDATE)
        self.close = register(CLOSE)
        self.begin_turn = register(BEGIN_TURN)
        self.end_turn = register(END_TURN)
        self.request_cancel = register(REQUEST_CANCEL)
        self.append = register(APPEND)
        self.append_batches = register(APPEND_BATCHES)
        self.read = register(READ)
        self.sweep_expired = register(SWEEP_EXPIRED)
        self.claim_ended = register(CLAIM_ENDED)
        self.retry_ended = register(RETRY_ENDED)
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
        client: aioredis.Redis,
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
        except (redis.exceptions.RedisError, OSError, TimeoutError):
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
        self._require_session_id(session_id)
        keys = [
            *self._keys.of_session(session_id),
            self._keys.messages(user_id),
            self._keys.tokens(user_id),
            self._keys.audio(user_id),
        ]
        args = [
            session_id,
            user_id,
            turn_id,
            owner,
            self._ttl_ms,
            EXPIRY_GRACE_MS,
            self._lease_ms,
            self._limits.messages_per_minute,
            self._limits.tokens_per_day,
            MAX_REMEMBERED_TURNS,
            self._limits.audio_ms_per_day,
            "1" if uses_audio else "0",
        ]
        reply = await self._scripts.begin_turn(keys=keys, args=args)
        self._raise_if_refused(reply, session_id, turn_id)
        _, last_seq, messages_left, tokens_left, audio_left, taken_over, cancel = reply
        if taken_over:
            log.warning(
                "session %s: turn %s takes over turn %s whose lease expired", session_id, turn_id, _text(taken_over)
            )
        quota = QuotaStatus(_remaining(messages_left), _remaining(tokens_left), _remaining(audio_left))
        return TurnStart(int(last_seq), quota, _text(taken_over), _cancel_request(session_id, turn_id, cancel))

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
    async def end_turn(self, session_id: str, turn_id: str, *, tokens: int = 0, audio_ms: int = 0) -> None:
        if not SESSION_ID.fullmatch(session_id):
            return
        args = [session_id, turn_id, tokens, self._keys.prefix, self._ttl_ms, EXPIRY_GRACE_MS, audio_ms]
        await self._scripts.end_turn(keys=self._keys.of_session(session_id), args=args)

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
        await self._redis.publish(self._keys.cancels(owner), f"{session_id} {running} {flag} {played_ms}")
        return running

    async def watch_cancels(self, owner: str) -> AsyncIterator[CancelRequest | None]:
        with _unavailable_when_redis_is():
            async with self._redis.pubsub() as pubsub:
                await pubsub.subscribe(self._keys.cancels(owner))
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        yield None  # Redis confirmed it: every publish from now on reaches us
                    elif message["type"] == "message":
                        yield _published_cancel(message["data"])

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
        """One script for every batch: one round trip however many sessions (its keys span them all)."""
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

    async def _housekeep(self) -> float | None:
        with _unavailable_when_redis_is():
            record = "1" if self._recorder is not None else "0"
            claimed = await self._scripts.sweep_expired(
                keys=[self._keys.expiries, self._keys.ended], args=[self._keys.prefix, SWEEP_BATCH, record]
            )
            if claimed:
                log.info("%d expired session(s) ended", claimed)
            more_expired = claimed >= SWEEP_BATCH
            if self._recorder is None:
                return 0.0 if more_expired else None
            delivered_all = await self._record_due_ends(self._recorder)
            if more_expired or not delivered_all:
                return 0.0
            next_due_ms = await self._scripts.next_ended_due(keys=[self._keys.ended])
        return None if next_due_ms < 0 else next_due_ms / 1000

    async def _record_due_ends(self, recorder: SessionEndRecorder) -> bool:
        """Deliver claimed end records; False when the batch was full (more may be due)."""
        reply = await self._scripts.claim_ended(
            keys=[self._keys.ended], args=[self._keys.prefix, CLAIM_BATCH, CLAIM_LEASE_MS]
        )
        claimed = _claimed_ends(reply)
        await asyncio.gather(*(self._deliver(recorder, end) for end in claimed))
        return len(claimed) < CLAIM_BATCH

    async def _deliver(self, recorder: SessionEndRecorder, claimed: _ClaimedEnd) -> None:
        session_id = claimed.ended.session_id
        if await try_record(recorder, claimed.ended, claimed.attempts):
            async with self._redis.pipeline(transaction=True) as acknowledge:
                acknowledge.zrem(self._keys.ended, session_id)
                acknowledge.delete(self._keys.ended_record(session_id))
                await acknowledge.execute()
            return
        delay_ms = int(retry_delay(claimed.attempts, self._end_retry) * 1000)
        await self._scripts.retry_ended(keys=[self._keys.ended], args=[session_id, delay_ms])

    # -- helpers

    @staticmethod
    def _require_session_id(session_id: str) -> None:
        if not SESSION_ID.fullmatch(session_id):
            raise session_not_found(session_id)

    @staticmethod
    def _require_found(reply: list[bytes], session_id: str) -> None:
        if reply[0] == b"NOT_FOUND":
            raise session_not_found(session_id)
