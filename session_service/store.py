"""Session state, running turns, per-session event logs, quotas and session-end records.

`SessionStore` is what the servicer talks to. `MemorySessionStore` (here) is the embedded backend,
`RedisSessionStore` (session_service/redis_store.py) the production one; both answer with the same
duplex.common.errors exceptions, so every backend gives the same gRPC codes and messages.
"""

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from duplex.common.errors import Aborted, DuplexError, FailedPrecondition, NotFound, OutOfRange
from session_service.quota import NO_LIMITS, MemoryQuotas, QuotaLimits, QuotaStatus
from session_service.session_end import EndedSession, Housekeeper, SessionEndRecorder, retry_delay, try_record

log = logging.getLogger(__name__)

# At most this many events per ReadEvents message, so one message stays far below gRPC's 4 MiB limit.
MAX_EVENTS_PER_BATCH = 500
# Expired sessions are also caught on access; the sweeper only bounds how long forgotten ones linger.
MAX_SWEEP_INTERVAL_SECONDS = 30.0
MIN_SWEEP_INTERVAL_SECONDS = 0.01
DEFAULT_END_RETRY_SECONDS = 1.0
# A session remembers whether a turn began or ended (so its tokens are counted once and an ended turn is not
# restarted) for only its newest this many turns, and always for its active turn; without a bound a session
# that stays active would grow by one entry per turn forever. Forgetting is safe: turn ids are fresh UUIDs
# from the gateway, and a BeginTurn/EndTurn replayed for a turn that ended this many turns ago is not a
# realistic case. Shared by every backend.
MAX_REMEMBERED_TURNS = 100

Clock = Callable[[], float]


@dataclass(frozen=True)
class LogEntry:
    """One event of a session's log; the payload is opaque to the store."""

    seq: int
    turn_id: str
    payload: bytes
    terminal: bool = False


@dataclass(frozen=True)
class EventBatch:
    """Events for one session's log, one of several appended together."""

    session_id: str
    events: Sequence[LogEntry]


# What appending one batch came to: the log's new last seq, or the error that refused the batch.
AppendOutcome = int | DuplexError


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
    persona: str = ""
    active_turn_owner: str = ""
    # The gateway's serialized voice settings; opaque here.
    voice_options: bytes = b""


@dataclass(frozen=True)
class TurnStart:
    """What BeginTurn answers: where the log stands and what is left of the user's quotas."""

    last_seq: int
    quota: QuotaStatus
    # The turn replaced because its owner's lease ran out; "" when none.
    taken_over_turn_id: str = ""
    # On a renewal: the request to stop this turn, when one was made (see request_cancel).
    cancel: "CancelRequest | None" = None


@dataclass(frozen=True)
class CancelRequest:
    """A request to stop one running turn, for the gateway that runs it (its owner)."""

    session_id: str
    turn_id: str
    interrupt: bool = False  # a voice barge-in: keep only the answer heard by played_ms
    played_ms: int = 0


class SessionStore(Protocol):
    """Sessions owned by users. Every user-scoped call answers NotFound for a session the user does not own,
    exactly as for one that does not exist, so existence never leaks."""

    async def start(self) -> None:
        """Start background work (expiry, recording ended sessions)."""

    async def close(self) -> None:
        """Stop background work, end every reader and release resources."""

    async def is_ready(self) -> bool:
        """Whether the backend answers (health)."""

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
        """Create a session (empty session_id) or re-attach to one; returns it and whether it was resumed.
        voice_options only apply to a new session; a re-attach keeps the session's (see update_session)."""

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        """Return the session without refreshing its TTL."""

    async def update_session(self, user_id: str, session_id: str, *, voice_options: bytes) -> SessionInfo:
        """Replace the session's voice options (empty clears them) and refresh its TTL; returns it."""

    async def close_session(self, user_id: str, session_id: str) -> None:
        """Drop the session and its log; its readers end; its end is recorded."""

    async def begin_turn(
        self, user_id: str, session_id: str, turn_id: str, *, owner: str = "", uses_audio: bool = False
    ) -> TurnStart:
        """Mark turn_id as running (owned by `owner`), counting one message against the user's quota.

        Beginning the turn that is already the session's turn is a retry: it renews the lease and counts
        nothing. FailedPrecondition while another turn runs or when turn_id already ended;
        ResourceExhausted (with retry_after) over quota, the audio quota only for a turn that uses_audio.
        A refusal changes nothing."""

    async def end_turn(
        self, session_id: str, turn_id: str, *, tokens: int = 0, audio_ms: int = 0, unanswered: bool = False
    ) -> None:
        """Clear the running turn if it is turn_id (a no-op otherwise); count `tokens` and `audio_ms`
        against the owner's daily quotas once per begun turn, however often EndTurn is repeated. An
        `unanswered` turn (its message a duplicate, or never stored) gives back the message it counted."""

    async def append_events(self, session_id: str, events: Sequence[LogEntry]) -> int:
        """Append events whose seqs continue the log; returns the new last seq."""

    async def append_event_batches(self, batches: Sequence[EventBatch]) -> list[AppendOutcome]:
        """append_events for each batch, in order, in one go; a refused batch changes nothing and does not
        stop the others: its outcome is the error. Backend failures still raise."""

    def read_events(
        self, user_id: str, session_id: str, after_seq: int, *, follow: bool
    ) -> AsyncIterator[list[LogEntry]]:
        """Yield the events after after_seq in batches; with follow, keep going while a turn runs."""

    async def request_cancel(
        self, user_id: str, session_id: str, turn_id: str, *, interrupt: bool = False, played_ms: int = 0
    ) -> str:
        """Ask the running turn (turn_id, or whichever runs when empty) to stop: record the request on the
        turn, where its owner's renewals see it, and send it to the owner's watchers. Returns the turn
        asked, "" when none (or not that one) runs. A later request replaces an earlier one."""

    def watch_cancels(self, owner: str) -> AsyncIterator[CancelRequest | None]:
        """None once the watch is in place, then the cancel requests made from then on for turns `owner`
        runs, until the caller stops. (A request made before the None is seen by the owner's renewals.)"""


# -- rules and messages shared by every backend


def check_contiguous(last_seq: int, seqs: Sequence[int]) -> None:
    if not seqs:
        raise no_events_error(last_seq + 1)
    for offset, seq in enumerate(seqs):
        expected = last_seq + 1 + offset
        if seq != expected:
            raise gap_error(expected, seq)


def _already_logged(session: "_Session", events: Sequence[LogEntry]) -> int:
    """How many of `events`, from the first, the log holds exactly: a retry of an append that landed but
    whose answer was lost. Any that differs is left in, for check_contiguous to refuse as a gap."""
    if not events:
        raise no_events_error(session.last_seq + 1)
    first_kept = session.events[0].seq if session.events else session.last_seq + 1
    same = 0
    for offset, event in enumerate(events):
        seq = event.seq
        if seq > session.last_seq or seq != events[0].seq + offset or seq < first_kept:
            break
        logged = session.events[seq - first_kept]
        if (logged.turn_id, logged.payload, logged.terminal) != (event.turn_id, event.payload, event.terminal):
            break
        same += 1
    return same


def no_events_error(expected: int) -> Aborted:
    return Aborted(f"expected events starting at seq {expected}, got none")


def gap_error(expected: int, got: int) -> Aborted:
    return Aborted(f"expected seq {expected}, got {got}")


def trimmed_error(after_seq: int, first_retained: int) -> OutOfRange:
    """A cursor whose next events were dropped is refused rather than silently skipping them.

    A cursor AHEAD of the log is fine: a client may have seen events live that the gateway has not
    appended yet; with follow it simply receives what comes after its cursor once they land."""
    return OutOfRange(f"events after seq {after_seq} were dropped; the log starts at seq {first_retained}")


def session_not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id} not found")


def turn_running_error() -> FailedPrecondition:
    return FailedPrecondition("a turn is already running")


def turn_ended_error(turn_id: str) -> FailedPrecondition:
    # A late retry of a finished turn must not mark the session busy again with nobody running it.
    return FailedPrecondition(f"turn {turn_id} already ended")


def sweep_interval(ttl_seconds: float) -> float:
    return min(MAX_SWEEP_INTERVAL_SECONDS, max(MIN_SWEEP_INTERVAL_SECONDS, ttl_seconds / 2))


# -- the memory backend


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
    owner: str
    lease_expires_at: float
    cancel: CancelRequest | None = None
    message_counted_at: float | None = None  # when its message was counted against the user's quota


class CancelFeeds:
    """Cancel requests handed to the watchers of each owner in this process. A watcher that falls
    behind by a whole queue loses requests; its owner's next lease renewal reports them anyway."""

    QUEUE_REQUESTS = 1024

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[CancelRequest]]] = {}

    def publish(self, owner: str, request: CancelRequest) -> None:
        for queue in self._watchers.get(owner, ()):
            try:
                queue.put_nowait(request)
            except asyncio.QueueFull:
                log.warning("a cancel watcher of %s is %d requests behind; dropping one", owner, queue.qsize())

    async def watch(self, owner: str) -> AsyncIterator[CancelRequest | None]:
        queue: asyncio.Queue[CancelRequest] = asyncio.Queue(self.QUEUE_REQUESTS)
        watchers = self._watchers.setdefault(owner, set())
        watchers.add(queue)
        try:
            yield None  # in place: every request from now on reaches the queue
            while True:
                yield await queue.get()
        finally:
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(owner, None)


_BEGUN, _ENDED = "begun", "ended"


@dataclass
class _Session:
    session_id: str
    user_id: str
    conversation_id: str
    model: str
    system_prompt: str
    persona: str
    created_at: float
    expires_at: float
    voice_options: bytes = b""
    last_seq: int = 0
    # Contiguous: events[i].seq == first_retained_seq() + i.
    events: list[LogEntry] = field(default_factory=list)
    # Kept after its lease expires, until EndTurn or a takeover, but then no longer counts as running.
    turn: _Turn | None = None
    # turn id -> _BEGUN / _ENDED, so a turn's tokens are counted once and an ended turn is not restarted;
    # oldest first, at most MAX_REMEMBERED_TURNS of them (see remember_turn).
    turn_states: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    changes: _ChangeSignal = field(default_factory=_ChangeSignal)

    def first_retained_seq(self) -> int:
        return self.last_seq - len(self.events) + 1

    def events_after(self, seq: int, limit: int) -> list[LogEntry]:
        start = seq + 1 - self.first_retained_seq()
        return self.events[start : start + limit]

    def remember_turn(self, turn_id: str) -> None:
        """Mark turn_id (the active turn) begun and forget the oldest other states beyond the bound."""
        self.turn_states[turn_id] = _BEGUN  # an existing entry keeps its place
        excess = len(self.turn_states) - MAX_REMEMBERED_TURNS
        if excess > 0:
            oldest = [other for other in itertools.islice(self.turn_states, excess + 1) if other != turn_id]
            for other in oldest[:excess]:
                del self.turn_states[other]

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
            persona=self.persona,
            created_at=self.created_at,
            expires_at=self.expires_at,
            last_seq=self.last_seq,
            active_turn_id=turn.turn_id if turn else "",
            active_turn_owner=turn.owner if turn else "",
            voice_options=self.voice_options,
        )

    def ended(self, ended_at: float) -> EndedSession:
        return EndedSession(self.user_id, self.session_id, self.conversation_id, self.created_at, ended_at)


@dataclass
class _PendingEnd:
    ended: EndedSession
    due: float
    attempts: int = 0


def _check_not_trimmed(session: _Session, after_seq: int) -> None:
    first = session.first_retained_seq()
    if after_seq + 1 < first:
        raise trimmed_error(after_seq, first)


class MemorySessionStore:
    """Sessions in this process's memory: fast, and gone when the process stops.

    Sessions still open when the store closes are not recorded as ended (they die with the process);
    neither are end records still waiting for a retry."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        log_max_events: int,
        turn_lease_seconds: float,
        quota_limits: QuotaLimits = NO_LIMITS,
        recorder: SessionEndRecorder | None = None,
        end_retry_seconds: float = DEFAULT_END_RETRY_SECONDS,
        clock: Clock = time.time,
    ) -> None:
        if log_max_events < 1:
            raise ValueError("log_max_events must be at least 1")
        self._ttl = ttl_seconds
        self._log_max_events = log_max_events
        self._turn_lease = turn_lease_seconds
        self._quotas = MemoryQuotas(quota_limits)
        self._recorder = recorder
        self._end_retry = end_retry_seconds
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._pending_ends: list[_PendingEnd] = []
        self._cancels = CancelFeeds()
        self._housekeeper = Housekeeper("session-sweeper", self._housekeep, sweep_interval(ttl_seconds))

    # -- lifecycle

    async def start(self) -> None:
        self._housekeeper.start()

    async def close(self) -> None:
        await self._housekeeper.stop()
        for session in list(self._sessions.values()):
            self._remove(session, "store closed")

    async def is_ready(self) -> bool:
        return True

    def session_count(self) -> int:
        return len(self._sessions)

    # -- sessions

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
            session = self._create(user_id, conversation_id, model, system_prompt, persona, voice_options)
            return session.info(self._clock()), False
        session = self._owned(user_id, session_id)
        # A re-attach may switch model, prompt or persona; the conversation stays the session's own, and so
        # do its voice options (only UpdateSession replaces them, so a reconnect cannot reset them).
        if model:
            session.model = model
        if system_prompt:
            session.system_prompt = system_prompt
        if persona:
            session.persona = persona
        self._touch(session)
        return session.info(self._clock()), True

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        # Looking is not using: a status poll must not keep an abandoned session alive.
        return self._owned(user_id, session_id).info(self._clock())

    async def update_session(self, user_id: str, session_id: str, *, voice_options: bytes) -> SessionInfo:
        session = self._owned(user_id, session_id)
        session.voice_options = voice_options
        self._touch(session)
        return session.info(self._clock())

    async def close_session(self, user_id: str, session_id: str) -> None:
        self._remove(self._owned(user_id, session_id), "closed")

    # -- turns

    async def begin_turn(
        self, user_id: str, session_id: str, turn_id: str, *, owner: str = "", uses_audio: bool = False
    ) -> TurnStart:
        session = self._owned(user_id, session_id)
        now = self._clock()
        taken_over, cancel, counted_at = "", None, now
        if session.turn is not None and session.turn.turn_id == turn_id:
            quota = self._quotas.status(user_id, now)  # a retry: the message was counted the first time
            cancel, counted_at = session.turn.cancel, session.turn.message_counted_at
        else:
            quota = self._start_new_turn(session, turn_id, now, uses_audio)
            taken_over = session.turn.turn_id if session.turn is not None else ""
        session.turn = _Turn(turn_id, owner, now + self._turn_lease, cancel, counted_at)
        session.remember_turn(turn_id)
        self._touch(session)
        session.changes.notify()
        return TurnStart(session.last_seq, quota, taken_over, cancel)

    def _start_new_turn(self, session: _Session, turn_id: str, now: float, uses_audio: bool) -> QuotaStatus:
        """Every check that can refuse comes before the one change (counting the message)."""
        if session.running_turn(now) is not None:
            raise turn_running_error()
        if session.turn_states.get(turn_id) == _ENDED:
            raise turn_ended_error(turn_id)
        self._quotas.check(session.user_id, now, uses_audio=uses_audio)
        if session.turn is not None:
            log.warning(
                "session %s: turn %s takes over turn %s whose lease expired",
                session.session_id,
                turn_id,
                session.turn.turn_id,
            )
        return self._quotas.count_message(session.user_id, now)

    async def end_turn(
        self, session_id: str, turn_id: str, *, tokens: int = 0, audio_ms: int = 0, unanswered: bool = False
    ) -> None:
        session = self._live(session_id)
        if session is None:
            return
        if session.turn_states.get(turn_id) == _BEGUN:
            session.turn_states[turn_id] = _ENDED
            now = self._clock()
            running = session.turn
            if unanswered and running is not None and running.turn_id == turn_id:
                self._quotas.give_back_message(session.user_id, running.message_counted_at)
            self._quotas.add_tokens(session.user_id, tokens, now)
            self._quotas.add_audio(session.user_id, audio_ms, now)
        if session.turn is None or session.turn.turn_id != turn_id:
            return
        session.turn = None
        self._touch(session)
        # Followers waiting for more of this turn can now finish.
        session.changes.notify()

    async def request_cancel(
        self, user_id: str, session_id: str, turn_id: str, *, interrupt: bool = False, played_ms: int = 0
    ) -> str:
        session = self._owned(user_id, session_id)
        turn = session.running_turn(self._clock())
        if turn is None or turn_id not in ("", turn.turn_id):
            return ""
        turn.cancel = CancelRequest(session_id, turn.turn_id, interrupt, played_ms)
        self._cancels.publish(turn.owner, turn.cancel)
        return turn.turn_id

    def watch_cancels(self, owner: str) -> AsyncIterator[CancelRequest | None]:
        return self._cancels.watch(owner)

    # -- the event log

    async def append_events(self, session_id: str, events: Sequence[LogEntry]) -> int:
        return self._append(session_id, events)

    async def append_event_batches(self, batches: Sequence[EventBatch]) -> list[AppendOutcome]:
        outcomes: list[AppendOutcome] = []
        for batch in batches:
            try:
                outcomes.append(self._append(batch.session_id, batch.events))
            except DuplexError as error:
                outcomes.append(error)
        return outcomes

    def _append(self, session_id: str, events: Sequence[LogEntry]) -> int:
        session = self._live(session_id)
        if session is None:
            raise session_not_found(session_id)
        events = events[_already_logged(session, events):]
        if events:
            check_contiguous(session.last_seq, [event.seq for event in events])
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

    def _create(
        self, user_id: str, conversation_id: str, model: str, system_prompt: str, persona: str, voice_options: bytes
    ) -> _Session:
        now = self._clock()
        session = _Session(
            session_id=uuid.uuid4().hex,
            user_id=user_id,
            conversation_id=conversation_id,
            model=model,
            system_prompt=system_prompt,
            persona=persona,
            created_at=now,
            expires_at=now + self._ttl,
            voice_options=voice_options,
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
            raise session_not_found(session_id)
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
        if reason in ("closed", "expired"):
            # An expired session ended when it expired, not when someone noticed.
            ended_at = session.expires_at if reason == "expired" else self._clock()
            self._queue_end(session.ended(ended_at))

    def _queue_end(self, ended: EndedSession) -> None:
        if self._recorder is None:
            return
        self._pending_ends.append(_PendingEnd(ended, due=self._clock()))
        self._housekeeper.poke()

    async def _wait(self, changed: asyncio.Event, *, until: float) -> None:
        timeout = max(0.0, until - self._clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: on Python 3.11 it can swallow a cancel
                await changed.wait()

    async def _housekeep(self) -> float | None:
        self._sweep()
        self._quotas.forget_idle(self._clock())
        return await self._record_due_ends()

    def _sweep(self) -> None:
        for session in list(self._sessions.values()):
            # _is_open removes the session when it has expired, which also ends its followers.
            self._is_open(session)

    async def _record_due_ends(self) -> float | None:
        """Deliver the end records that are due; returns seconds until the next one is."""
        now = self._clock()
        due = [pending for pending in self._pending_ends if pending.due <= now]
        if due:
            delivered = await asyncio.gather(*(self._deliver(pending) for pending in due))
            sent = {id(pending) for pending, ok in zip(due, delivered, strict=True) if ok}
            self._pending_ends = [pending for pending in self._pending_ends if id(pending) not in sent]
        if not self._pending_ends:
            return None
        return min(pending.due for pending in self._pending_ends) - self._clock()

    async def _deliver(self, pending: _PendingEnd) -> bool:
        assert self._recorder is not None
        pending.attempts += 1
        if await try_record(self._recorder, pending.ended, pending.attempts):
            return True
        pending.due = self._clock() + retry_delay(pending.attempts, self._end_retry)
        return False
