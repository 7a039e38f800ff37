"""Session state, running turns and per-session event logs.

`SessionStore` is what the servicer talks to; `MemorySessionStore` is the embedded backend. A Redis backend
implements the same protocol later. Errors are duplex.common.errors exceptions, so every backend answers
with the same gRPC codes.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from duplex.common.errors import Aborted, FailedPrecondition, NotFound, OutOfRange

log = logging.getLogger(__name__)

# At most this many events per ReadEvents message, so one message stays far below gRPC's 4 MiB limit.
MAX_EVENTS_PER_BATCH = 500
# Expired sessions are also caught on access; the sweeper only bounds how long forgotten ones linger.
MAX_SWEEP_INTERVAL_SECONDS = 30.0
MIN_SWEEP_INTERVAL_SECONDS = 0.01

Clock = Callable[[], float]


@dataclass(frozen=True)
class LogEntry:
    """One event of a session's log; the payload is opaque to the store."""

    seq: int
    turn_id: str
    payload: bytes
    terminal: bool = False


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session; times are seconds since the epoch."""

    session_id: str
    user_id: str
    conversation_id: str
    model: str
    system_prompt: str
    created_at: float
    expires_at: float
    last_seq: int
    active_turn_id: str


class SessionStore(Protocol):
    """Sessions owned by users. Every user-scoped call answers NotFound for a session the user does not own,
    exactly as for one that does not exist, so existence never leaks."""

    async def start(self) -> None:
        """Start background work (expiry)."""

    async def close(self) -> None:
        """Stop background work, end every reader and release resources."""

    async def open_session(
        self, user_id: str, session_id: str, *, conversation_id: str, model: str, system_prompt: str
    ) -> tuple[SessionInfo, bool]:
        """Create a session (empty session_id) or re-attach to one; returns it and whether it was resumed."""

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        """Return the session without refreshing its TTL."""

    async def close_session(self, user_id: str, session_id: str) -> None:
        """Drop the session and its log; its readers end."""

    async def begin_turn(self, user_id: str, session_id: str, turn_id: str) -> int:
        """Mark turn_id as running; returns the log's last seq."""

    async def end_turn(self, session_id: str, turn_id: str) -> None:
        """Clear the running turn if it is turn_id; a no-op otherwise."""

    async def append_events(self, session_id: str, events: Sequence[LogEntry]) -> int:
        """Append events whose seqs continue the log; returns the new last seq."""

    def read_events(
        self, user_id: str, session_id: str, after_seq: int, *, follow: bool
    ) -> AsyncIterator[list[LogEntry]]:
        """Yield the events after after_seq in batches; with follow, keep going while a turn runs."""


class _ChangeSignal:
    """Wakes every reader of a session when it changes, without polling.

    A reader takes `token()` BEFORE looking at the session and then waits on that token. Any change made
    after the look sets that very token, so a reader can never sleep through an event appended between
    its catch-up and its wait, even when looking at the state involves awaits.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def token(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class _Turn:
    turn_id: str
    lease_expires_at: float


@dataclass
class _Session:
    session_id: str
    user_id: str
    conversation_id: str
    model: str
    system_prompt: str
    created_at: float
    expires_at: float
    last_seq: int = 0
    # Contiguous: events[i].seq == first_retained_seq() + i.
    events: list[LogEntry] = field(default_factory=list)
    # Kept after its lease expires, until EndTurn or a takeover, but then no longer counts as running.
    turn: _Turn | None = None
    closed: bool = False
    changes: _ChangeSignal = field(default_factory=_ChangeSignal)

    def first_retained_seq(self) -> int:
        return self.last_seq - len(self.events) + 1

    def events_after(self, seq: int, limit: int) -> list[LogEntry]:
        start = seq + 1 - self.first_retained_seq()
        return self.events[start : start + limit]

    def running_turn(self, now: float) -> _Turn | None:
        if self.turn is not None and now < self.turn.lease_expires_at:
            return self.turn
        return None

    def info(self, now: float) -> SessionInfo:
        turn = self.running_turn(now)
        return SessionInfo(
            session_id=self.session_id,
            user_id=self.user_id,
            conversation_id=self.conversation_id,
            model=self.model,
            system_prompt=self.system_prompt,
            created_at=self.created_at,
            expires_at=self.expires_at,
            last_seq=self.last_seq,
            active_turn_id=turn.turn_id if turn else "",
        )


def _check_contiguous(last_seq: int, events: Sequence[LogEntry]) -> None:
    if not events:
        raise Aborted(f"expected events starting at seq {last_seq + 1}, got none")
    for offset, event in enumerate(events):
        expected = last_seq + 1 + offset
        if event.seq != expected:
            raise Aborted(f"expected seq {expected}, got {event.seq}")


def _check_not_trimmed(session: _Session, after_seq: int) -> None:
    """Refuse a cursor whose next events were dropped, rather than silently skipping them.

    A cursor AHEAD of the log is fine: a client may have seen events live that the gateway has not
    appended yet; with follow it simply receives what comes after its cursor once they land.
    """
    first = session.first_retained_seq()
    if after_seq + 1 < first:
        raise OutOfRange(f"events after seq {after_seq} were dropped; the log starts at seq {first}")


class MemorySessionStore:
    """Sessions in this process's memory: fast, and gone when the process stops."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        log_max_events: int,
        turn_lease_seconds: float,
        clock: Clock = time.time,
    ) -> None:
        if log_max_events < 1:
            raise ValueError("log_max_events must be at least 1")
        self._ttl = ttl_seconds
        self._log_max_events = log_max_events
        self._turn_lease = turn_lease_seconds
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session in list(self._sessions.values()):
            self._remove(session, "store closed")

    def session_count(self) -> int:
        return len(self._sessions)

    # -- sessions

    async def open_session(
        self, user_id: str, session_id: str, *, conversation_id: str, model: str, system_prompt: str
    ) -> tuple[SessionInfo, bool]:
        if not session_id:
            session = self._create(user_id, conversation_id, model, system_prompt)
            return session.info(self._clock()), False
        session = self._owned(user_id, session_id)
        # A re-attach may switch model or persona; the conversation stays the session's own.
        if model:
            session.model = model
        if system_prompt:
            session.system_prompt = system_prompt
        self._touch(session)
        return session.info(self._clock()), True

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        # Looking is not using: a status poll must not keep an abandoned session alive.
        return self._owned(user_id, session_id).info(self._clock())

    async def close_session(self, user_id: str, session_id: str) -> None:
        self._remove(self._owned(user_id, session_id), "closed")

    # -- turns

    async def begin_turn(self, user_id: str, session_id: str, turn_id: str) -> int:
        session = self._owned(user_id, session_id)
        now = self._clock()
        running = session.running_turn(now)
        if running is not None and running.turn_id != turn_id:
            raise FailedPrecondition("a turn is already running")
        if running is None and session.turn is not None:
            log.warning(
                "session %s: turn %s takes over turn %s whose lease expired",
                session_id,
                turn_id,
                session.turn.turn_id,
            )
        session.turn = _Turn(turn_id, lease_expires_at=now + self._turn_lease)
        self._touch(session)
        session.changes.notify()
        return session.last_seq

    async def end_turn(self, session_id: str, turn_id: str) -> None:
        session = self._live(session_id)
        if session is None or session.turn is None or session.turn.turn_id != turn_id:
            return
        session.turn = None
        self._touch(session)
        # Followers waiting for more of this turn can now finish.
        session.changes.notify()

    # -- the event log

    async def append_events(self, session_id: str, events: Sequence[LogEntry]) -> int:
        session = self._live(session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        _check_contiguous(session.last_seq, events)
        session.events.extend(events)
        session.last_seq = events[-1].seq
        overflow = len(session.events) - self._log_max_events
        if overflow > 0:
            del session.events[:overflow]
        now = self._clock()
        # Appending is the owner's heartbeat: it keeps both the turn and the session alive.
        running = session.running_turn(now)
        if running is not None:
            running.lease_expires_at = now + self._turn_lease
        self._touch(session)
        session.changes.notify()
        return session.last_seq

    async def read_events(
        self, user_id: str, session_id: str, after_seq: int, *, follow: bool
    ) -> AsyncIterator[list[LogEntry]]:
        session = self._owned(user_id, session_id)
        # A client resuming is using the session.
        self._touch(session)
        cursor = after_seq
        while self._is_open(session):
            changed = session.changes.token()  # before looking: see _ChangeSignal
            # Every pass: the events after the cursor may be gone already, or get trimmed while a slow
            # reader lags; fail rather than skip them.
            _check_not_trimmed(session, cursor)
            batch = session.events_after(cursor, MAX_EVENTS_PER_BATCH)
            if batch:
                cursor = batch[-1].seq
                yield batch
                continue
            turn = session.running_turn(self._clock())
            if not follow or turn is None:
                return
            # Wake on a change, or when the lease runs out so a dead turn does not hold readers forever.
            await self._wait(changed, until=turn.lease_expires_at)

    # -- internals

    def _create(self, user_id: str, conversation_id: str, model: str, system_prompt: str) -> _Session:
        now = self._clock()
        session = _Session(
            session_id=uuid.uuid4().hex,
            user_id=user_id,
            conversation_id=conversation_id,
            model=model,
            system_prompt=system_prompt,
            created_at=now,
            expires_at=now + self._ttl,
        )
        self._sessions[session.session_id] = session
        log.info("session %s opened for user %s", session.session_id, user_id)
        return session

    def _live(self, session_id: str) -> _Session | None:
        """The session if it exists and has not expired; an expired one is removed on the spot."""
        session = self._sessions.get(session_id)
        if session is not None and self._is_open(session):
            return session
        return None

    def _owned(self, user_id: str, session_id: str) -> _Session:
        session = self._live(session_id)
        # Same answer for "not yours" and "does not exist", so existence never leaks.
        if session is None or session.user_id != user_id:
            raise NotFound(f"session {session_id} not found")
        return session

    def _is_open(self, session: _Session) -> bool:
        if not session.closed and self._clock() >= session.expires_at:
            self._remove(session, "expired")
        return not session.closed

    def _touch(self, session: _Session) -> None:
        session.expires_at = self._clock() + self._ttl

    def _remove(self, session: _Session, reason: str) -> None:
        self._sessions.pop(session.session_id, None)
        if session.closed:
            return
        session.closed = True
        session.events.clear()
        session.changes.notify()
        log.info("session %s %s", session.session_id, reason)

    async def _wait(self, changed: asyncio.Event, *, until: float) -> None:
        timeout = max(0.0, until - self._clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def _sweep_interval(self) -> float:
        return min(MAX_SWEEP_INTERVAL_SECONDS, max(MIN_SWEEP_INTERVAL_SECONDS, self._ttl / 2))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval())
            try:
                self._sweep()
            except Exception:
                log.exception("sweeping expired sessions failed")

    def _sweep(self) -> None:
        for session in list(self._sessions.values()):
            # _is_open removes the session when it has expired, which also ends its followers.
            self._is_open(session)
