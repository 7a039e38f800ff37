"""Per-session event hubs: where a turn publishes events and where every client of the session reads them.

A hub numbers events with the session's seq, keeps the most recent ones in memory (so same-replica
followers and resumes never touch the session service), and hands them to the session service's log in
batches. Followers read by cursor, so a slow client never slows a turn or holds more than the buffer.
"""

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import DuplexError, FailedPrecondition, NotFound, OutOfRange, Unavailable
from duplex.session.v1 import session_pb2
from gateway.clients import SessionClient

if TYPE_CHECKING:
    from gateway.context import ConversationContext
    from gateway.turn import Turn

log = logging.getLogger(__name__)

TERMINAL_KINDS = frozenset({"turn_completed", "turn_cancelled", "error"})
# Followers never run more than this many events ahead of the session log, so a replica that dies can have
# shown its clients at most this many events the log never got (see gateway.recovery).
UNLOGGED_LIMIT = 32
# One AppendEventBatches call carries at most this much: the session service refuses more than 1000 sessions
# or 10000 events per call (session.proto) and gRPC more than 4 MiB; 1 MiB of payloads leaves room for the
# framing around them. What does not fit goes in another call, or, for one hub's backlog, the next tick's.
MAX_SESSIONS_PER_APPEND = 1000
MAX_EVENTS_PER_APPEND = 10_000
MAX_PAYLOAD_BYTES_PER_APPEND = 1 << 20

# A turn whose events the log has not taken for this long fails rather than buffer more (about 3 MB).
MAX_UNLOGGED_EVENTS = 10_000
# While the log keeps failing, "still failing" is said at most this often (not on every 20 ms retry).
OUTAGE_REMINDER_SECONDS = 30.0
# A turn's end the session service did not take is told again this often.
END_RETRY_SECONDS = 0.5

# A hub and the events taken from it for one append.
Batch = tuple["SessionHub", list[session_pb2.LogEvent]]


class LogUnreachable(Unavailable):
    """The session's log has taken nothing for a while: a follower it holds back ends, so its client
    resumes once the session service is back instead of waiting on a silent stream."""


class SessionLost(NotFound):
    """The session service no longer has the session (a memory store that restarted): its events can
    never be logged, so its streams end and its turn fails."""


class Outage:
    """Says once that something keeps failing, now and then that it still does, and once that it is back."""

    def __init__(self, what: str):
        self._what = what
        self.since: float | None = None
        self._failures = 0
        self._said = False
        self._reminded_at = 0.0

    def failed(self, error: Exception, say: bool = True) -> None:
        """say=False: counted and timed, but someone else reports it."""
        now = time.monotonic()
        self._failures += 1
        if self.since is None:
            self.since = now
        if not say:
            return
        if not self._said:
            self._said, self._reminded_at = True, now
            log.warning("%s failed (%s); retrying", self._what, error)
        elif now - self._reminded_at >= OUTAGE_REMINDER_SECONDS:
            self._reminded_at = now
            log.warning("%s still failing after %.0f s (%d attempts): %s", self._what, now - self.since,
                        self._failures, error)

    def succeeded(self) -> None:
        if self._said:
            log.info("%s works again after %.1f s (%d failed attempts)", self._what,
                     time.monotonic() - self.since, self._failures)
        self.since, self._failures, self._said = None, 0, False

    def lasted(self, seconds: float) -> bool:
        return self.since is not None and time.monotonic() - self.since > seconds


def error_event(error: DuplexError, turn_id: str = "") -> chat_pb2.ChatEvent:
    chat_error = chat_pb2.ChatError(code=error.code.value[0], message=error.message, retryable=error.retryable)
    if error.retry_after:
        chat_error.retry_after.FromNanoseconds(int(error.retry_after * 1e9))
    return chat_pb2.ChatEvent(turn_id=turn_id, error=chat_error)


def is_terminal(event: chat_pb2.ChatEvent) -> bool:
    return bool(event.turn_id) and event.WhichOneof("kind") in TERMINAL_KINDS


@dataclass
class TurnEnd:
    """A turn's end and usage, as EndTurn tells the session service."""

    turn_id: str
    tokens: int
    audio_ms: int
    retry_at: float = 0.0


class RecentEvents:
    """A session's latest events, serialized (a tenth of the memory of message objects) and contiguous up to
    its last seq, within a count and a byte budget: followers and resumes read them from here, older ones
    from the log."""

    def __init__(self, max_events: int, max_bytes: int):
        self._payloads: deque[bytes] = deque()
        self._max_events = max(1, max_events)
        self._max_bytes = max_bytes
        self._bytes = 0

    def append(self, payload: bytes) -> None:
        self._payloads.append(payload)
        self._bytes += len(payload)
        while len(self._payloads) > 1 and (len(self._payloads) > self._max_events or self._bytes > self._max_bytes):
            self._bytes -= len(self._payloads.popleft())

    def after(self, cursor: int, last_seq: int) -> list[chat_pb2.ChatEvent] | None:
        """The events after `cursor`, the newest being `last_seq`; None when some are no longer here."""
        if cursor >= last_seq:
            return []
        first_seq = last_seq - len(self._payloads) + 1
        if not self._payloads or cursor + 1 < first_seq:
            return None
        kept = itertools.islice(self._payloads, cursor + 1 - first_seq, None)
        return [chat_pb2.ChatEvent.FromString(payload) for payload in kept]

    def clear(self) -> None:
        self._payloads.clear()
        self._bytes = 0


class SessionHub:
    def __init__(
        self, session_id: str, user_id: str, last_seq: int, sessions: SessionClient, capacity: int,
        capacity_bytes: int, outage_seconds: float = 3.0,
    ):
        self.session_id = session_id
        self.user_id = user_id
        self.last_seq = last_seq
        self.logged_seq = last_seq  # the last seq the session service has
        self._turn: Turn | None = None  # the turn running in this session on this replica, if any
        self._context: ConversationContext | None = None  # the conversation as the last turn here left it
        self.references = 0
        self._sessions = sessions
        self._recent = RecentEvents(capacity, capacity_bytes)
        self._unflushed: list[session_pb2.LogEvent] = []
        # Held by whoever sends this hub's events (flush() or the registry's batch flush), from taking them
        # until the log answered, so the log gets each event once and in order (it refuses gaps).
        self.flush_lock = asyncio.Lock()
        self.logged_at = time.monotonic()  # when the log last heard from this hub (appends renew the lease)
        self.logging = Outage(f"session {session_id}: logging events")
        self._outage_seconds = outage_seconds  # a follower held back this long by a failing log ends
        self.lost: SessionLost | None = None
        self.unsent_end: TurnEnd | None = None  # a turn's end the session service has not taken yet
        self._changed = asyncio.Event()
        self.on_dirty: Callable[[SessionHub], None] = lambda hub: None

    # -- the session's live state on this replica: its running turn and its conversation. Only these
    # methods change them; everything else reads them.

    @property
    def turn(self) -> "Turn | None":
        return self._turn

    def take_turn(self, turn: "Turn") -> None:
        """Make `turn` the session's running turn, before any await, so a concurrent message is refused."""
        if self._turn is not None:
            raise FailedPrecondition("a turn is already running in this session; cancel it or wait")
        self._turn = turn

    def release_turn(self, turn: "Turn") -> None:
        """`turn` ended (or never began): the session may take another; followers waiting on it go on."""
        if self._turn is turn:
            self._turn = None
        self.wake()

    @property
    def context(self) -> "ConversationContext | None":
        return self._context

    def keep_context(self, context: "ConversationContext | None") -> None:
        """The conversation as it stands now, for the next turn here; None: it reads history back."""
        self._context = context

    def publish(self, event: chat_pb2.ChatEvent) -> chat_pb2.ChatEvent:
        """Number, timestamp, buffer and queue `event` for the log; wake every follower."""
        self.last_seq += 1
        event.seq = self.last_seq
        event.session_id = self.session_id
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        payload = event.SerializeToString()
        self._recent.append(payload)
        if self.lost is None:  # a lost session's log is gone: nothing can be logged
            self._unflushed.append(
                session_pb2.LogEvent(seq=event.seq, turn_id=event.turn_id, payload=payload, terminal=is_terminal(event))
            )
            self.on_dirty(self)
        self.wake()
        return event

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def restart_at(self, last_seq: int) -> None:
        """The log moved on elsewhere (another replica ran a turn): drop what this hub remembers."""
        if last_seq != self.last_seq:
            self._recent.clear()
            self.last_seq = last_seq
        self.logged_seq = last_seq

    @property
    def has_unflushed(self) -> bool:
        return bool(self._unflushed)

    async def flush(self) -> None:
        """Log every event published so far before returning (turn end, reading older events)."""
        async with self.flush_lock:
            while self._unflushed:
                batch = self.take_unflushed()
                try:
                    await self._sessions.append_events(self.session_id, batch)
                except DuplexError as error:
                    self.put_back(batch, error)
                    raise
                except BaseException:  # cancelled mid-call: the events stay for the flusher
                    self.put_back(batch)
                    raise
                self.mark_logged(batch)

    def take_unflushed(self) -> list[session_pb2.LogEvent]:
        """The oldest unflushed events, at least one and no more than one append call takes. The caller
        holds flush_lock until the log answered, then calls put_back() or mark_logged()."""
        count = size = 0
        for event in itertools.islice(self._unflushed, MAX_EVENTS_PER_APPEND):
            size += len(event.payload)
            if count and size > MAX_PAYLOAD_BYTES_PER_APPEND:
                break
            count += 1
        batch, self._unflushed = self._unflushed[:count], self._unflushed[count:]
        return batch

    def put_back(
        self, batch: list[session_pb2.LogEvent], error: Exception | None = None, say: bool = True
    ) -> None:
        """The log did not take `batch`: it goes back in front of anything newer, and the flusher retries.
        `error` is why (None: the call was cancelled); say=False when the caller reports it."""
        if isinstance(error, NotFound):
            return self.lose(error)
        self._unflushed[:0] = batch
        if error is not None:
            self.logging.failed(error, say)
            if self.logging.lasted(self._outage_seconds):
                self.wake()  # followers it holds back give up
            if len(self._unflushed) > MAX_UNLOGGED_EVENTS and self.turn is not None:
                self.turn.fail(LogUnreachable("the session service has not taken this answer's events; send the "
                                              "message again once it is back"))
        self.on_dirty(self)

    async def end_turn(self, turn_id: str, tokens: int, audio_ms: int) -> None:
        """Tell the session service a turn ended, after its events: at once when they are logged, else
        (and whenever it cannot be told) the registry's flusher does, once they are."""
        self.unsent_end = TurnEnd(turn_id, tokens, audio_ms)
        if self.has_unflushed:
            self.on_dirty(self)
        else:
            await self.send_end()

    async def send_end(self) -> bool:
        """Send unsent_end; False (kept for a retry) when the session service did not take it. True when
        there is none (another path sent it while this one waited)."""
        end = self.unsent_end
        if end is None:
            return True
        try:
            await self._sessions.end_turn(self.session_id, end.turn_id, end.tokens, audio_ms=end.audio_ms)
        except NotFound:
            pass  # gone with its session
        except DuplexError as error:
            log.warning("session %s: turn %s's end not recorded yet (%s); retrying", self.session_id, end.turn_id,
                        error.message)
            end.retry_at = time.monotonic() + END_RETRY_SECONDS
            self.on_dirty(self)
            return False
        if self.unsent_end is end:
            self.unsent_end = None
        return True

    def lose(self, error: NotFound) -> None:
        """The session service no longer has this session: drop what it cannot take, end its streams and
        fail its turn."""
        if self.lost is not None:
            return
        log.warning("session %s is gone from the session service (%s); ending its streams", self.session_id,
                    error.message)
        self.lost = SessionLost("this session is gone from the session service (it restarted); open a new "
                                "session and send the message again")
        self._unflushed.clear()
        if self.turn is not None:
            self.turn.fail(self.lost)
        self.wake()

    def mark_logged(self, batch: list[session_pb2.LogEvent]) -> None:
        self.logging.succeeded()
        self.logged_at = time.monotonic()
        held_back = self.last_seq - self.logged_seq > UNLOGGED_LIMIT
        self.logged_seq = max(self.logged_seq, batch[-1].seq)
        if held_back:
            self.wake()  # followers held back by the limit may go on

    def _buffered_after(self, cursor: int) -> list[chat_pb2.ChatEvent] | None:
        """Events after `cursor` from memory; None when some of them are no longer in memory."""
        return self._recent.after(cursor, self.last_seq)

    async def follow(
        self, after_seq: int, stop_when_idle: Callable[[], bool] = lambda: True
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Every event after `after_seq` exactly once, then live ones. Ends once caught up with no turn
        running here and `stop_when_idle()` is true."""
        cursor = after_seq
        # Held back by a failing log, a follower ends once it has waited the outage time itself: one that
        # resumes just as the session service is back must not end on the flusher's failure of a moment ago.
        give_up_at = time.monotonic() + self._outage_seconds
        while True:
            if self.lost is not None:
                raise self.lost
            changed = self._changed
            events = self._buffered_after(cursor)
            if events is None:
                start = cursor
                async for event in self._read_logged(cursor):
                    cursor = event.seq
                    yield event
                if cursor == start:
                    raise OutOfRange(f"events after seq {start} are no longer available")
                continue
            deliverable = [event for event in events if event.seq <= self.logged_seq + UNLOGGED_LIMIT]
            for event in deliverable:
                cursor = event.seq
                yield event
            if cursor >= self.last_seq and self.turn is None and stop_when_idle():
                return
            held_back = len(deliverable) < len(events)
            if held_back and self.logging.lasted(self._outage_seconds) and time.monotonic() >= give_up_at:
                raise LogUnreachable(f"the session service is not answering; resume after seq {cursor} once it is back")
            if not events or held_back:
                await changed.wait()

    async def _read_logged(self, cursor: int) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Older events than memory holds, from the session service's log (flushed first)."""
        await self.flush()
        async for logged in self._sessions.read_events(self.user_id, self.session_id, cursor, follow=False):
            if logged.seq > self.last_seq:
                break
            yield chat_pb2.ChatEvent.FromString(logged.payload)


class HubRegistry:
    """The hubs of the sessions in use on this replica, and the task that flushes them to the log."""

    def __init__(
        self, sessions: SessionClient, capacity: int, flush_interval: float, owner: str, lease_renew_interval: float,
        capacity_bytes: int, outage_seconds: float = 3.0,
    ):
        self._sessions = sessions
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes
        self._outage_seconds = outage_seconds
        self._appending = Outage("logging events to the session service")
        self._renewing = Outage("renewing turn leases")
        self._flush_interval = flush_interval
        self._owner = owner
        self._lease_renew_interval = lease_renew_interval
        self._hubs: dict[str, SessionHub] = {}
        self._dirty: set[SessionHub] = set()
        self._flusher: asyncio.Task | None = None

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically(), name="hub-flusher")

    async def close(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_dirty()

    def get(self, session_id: str) -> SessionHub | None:
        return self._hubs.get(session_id)

    def acquire(self, session_id: str, user_id: str, last_seq: int) -> SessionHub:
        hub = self._hubs.get(session_id)
        if hub is None:
            hub = SessionHub(
                session_id, user_id, last_seq, self._sessions, self._capacity, self._capacity_bytes,
                self._outage_seconds,
            )
            hub.on_dirty = self._mark_dirty
            self._hubs[session_id] = hub
        hub.references += 1
        return hub

    def _mark_dirty(self, hub: SessionHub) -> None:
        self._dirty.add(hub)  # looked up each time: the flusher swaps in a fresh set every tick

    async def release(self, hub: SessionHub) -> None:
        hub.references -= 1
        if hub.references > 0:
            return
        try:
            await hub.flush()
        except DuplexError:
            log.warning("session %s: events not yet logged; retrying in the background", hub.session_id)
            return  # stays dirty; the flusher retries and the hub is forgotten on a later release
        self._forget_if_unused(hub)

    def _forget_if_unused(self, hub: SessionHub) -> None:
        unused = hub.references == 0 and hub.turn is None and not hub.has_unflushed and hub.unsent_end is None
        if unused and self._hubs.get(hub.session_id) is hub:
            del self._hubs[hub.session_id]

    @contextlib.asynccontextmanager
    async def attached(self, session_id: str, user_id: str, last_seq: int) -> AsyncIterator[SessionHub]:
        hub = self.acquire(session_id, user_id, last_seq)
        try:
            yield hub
        finally:
            await self.release(hub)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            await self._flush_dirty()
            await self._renew_quiet_leases()

    async def renew_leases(self) -> None:
        """Renew every running turn's lease; the answers report stops asked while this replica was not
        watching for them (gateway.cancels)."""
        await self._renew([(hub, hub.turn) for hub in self._hubs.values() if hub.turn is not None])

    async def _renew_quiet_leases(self) -> None:
        """A turn that logs nothing for a while (waiting for a slow first token, running a tool) renews
        its lease, so other replicas never mistake it for one whose gateway died."""
        due = time.monotonic() - self._lease_renew_interval
        await self._renew([
            (hub, hub.turn) for hub in self._hubs.values() if hub.turn is not None and hub.logged_at < due
        ])

    async def _renew(self, turns: list[tuple[SessionHub, "Turn"]]) -> None:
        results = await asyncio.gather(*(self._renew_lease(hub, turn) for hub, turn in turns), return_exceptions=True)
        failures = [
            (hub, result) for (hub, turn), result in zip(turns, results, strict=True)
            if isinstance(result, Exception) and hub.turn is turn  # one that ended meanwhile needs no lease
        ]
        for hub, error in failures:
            if isinstance(error, NotFound):
                hub.lose(error)
            else:
                self._renewing.failed(error)
        if turns and not failures:
            self._renewing.succeeded()

    async def _renew_lease(self, hub: SessionHub, turn: "Turn") -> None:
        hub.logged_at = time.monotonic()  # tried now: retried in an interval, not on every tick
        begun = await self._sessions.begin_turn(hub.user_id, hub.session_id, turn.id, self._owner)  # same id renews
        if begun.HasField("cancel_requested"):  # asked on another replica
            turn.stop(begun.cancel_requested.interrupt, begun.cancel_requested.played_ms)

    async def _flush_dirty(self) -> None:
        """Log every dirty hub's events in one AppendEventBatches call (more only past one call's bounds),
        rather than one call per session. A hub whose own flush() is sending is left to the next tick."""
        dirty, self._dirty = self._dirty, set()
        async with contextlib.AsyncExitStack() as sending:
            batches: list[Batch] = []
            for hub in dirty:
                if hub.flush_lock.locked():
                    self._dirty.add(hub)
                    continue
                await sending.enter_async_context(hub.flush_lock)
                if hub.has_unflushed:
                    batches.append((hub, hub.take_unflushed()))
            await asyncio.gather(*(self._append(call) for call in _pack(batches)))
        ending = []
        for hub in dirty:
            if hub.has_unflushed:
                self._dirty.add(hub)  # refused, or a backlog longer than one call takes
            elif hub.unsent_end is not None:
                ending.append(hub)  # its turn's events are all logged: its end may follow
            else:
                self._forget_if_unused(hub)  # it may have been released while its events were retried
        await asyncio.gather(*(self._send_end(hub) for hub in ending))

    async def _send_end(self, hub: SessionHub) -> None:
        # Read again: a new turn's start (or its flush) may have sent the end since it was listed.
        end = hub.unsent_end
        if end is not None and (time.monotonic() < end.retry_at or not await hub.send_end()):
            self._dirty.add(hub)
        else:
            self._forget_if_unused(hub)

    async def _append(self, call: list[Batch]) -> None:
        try:
            errors = await self._sessions.append_event_batches([(hub.session_id, batch) for hub, batch in call])
        except Exception as error:  # the whole call failed: every batch is retried
            if not isinstance(error, DuplexError):
                log.exception("logging events of %d session(s) failed", len(call))
            self._appending.failed(error)
            for hub, batch in call:
                hub.put_back(batch, error, say=False)
            return
        except BaseException:  # cancelled mid-call (closing): the events stay for the last flush
            for hub, batch in call:
                hub.put_back(batch)
            raise
        self._appending.succeeded()
        for (hub, batch), error in zip(call, errors, strict=True):
            if error is None:
                hub.mark_logged(batch)
            else:
                hub.put_back(batch, error)


def _pack(batches: list[Batch]) -> list[list[Batch]]:
    """The batches grouped into as few append calls as the per-call bounds allow (one, short of a backlog)."""
    calls: list[list[Batch]] = []
    call: list[Batch] = []
    events = size = 0
    for hub, batch in batches:
        batch_size = sum(len(event.payload) for event in batch)
        full = (
            len(call) == MAX_SESSIONS_PER_APPEND
            or events + len(batch) > MAX_EVENTS_PER_APPEND
            or size + batch_size > MAX_PAYLOAD_BYTES_PER_APPEND
        )
        if call and full:
            calls.append(call)
            call, events, size = [], 0, 0
        call.append((hub, batch))
        events += len(batch)
        size += batch_size
    if call:
        calls.append(call)
    return calls
