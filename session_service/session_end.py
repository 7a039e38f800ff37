"""Recording ended sessions with history_service, and the background loop that does it.

When a session is closed or expires, the store queues an `EndedSession`; its housekeeping loop hands it to
a `SessionEndRecorder` (history_service's RecordSessionEnd) and retries with exponential backoff until
that succeeds. RecordSessionEnd is idempotent, so delivering a record twice (a replica dying between
the call and the acknowledgement) is harmless; losing one is not.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from duplex.common.errors import DuplexError, InvalidArgument, NotFound, from_rpc_error
from duplex.common.server import insecure_channel
from duplex.history.v1 import history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

RECORD_TIMEOUT_SECONDS = 5.0
MAX_RETRY_DELAY_SECONDS = 300.0


@dataclass(frozen=True)
class EndedSession:
    """A closed or expired session; times are seconds since the epoch."""

    user_id: str
    session_id: str
    conversation_id: str
    started_at: float
    ended_at: float


class SessionEndRecorder(Protocol):
    async def record(self, ended: EndedSession) -> None:
        """Record the end durably; raise if that did not happen."""


def retry_delay(attempts: int, initial: float) -> float:
    """Seconds before the next try after `attempts` failed ones: initial, 2x, 4x ... capped."""
    return min(MAX_RETRY_DELAY_SECONDS, initial * 2 ** max(0, attempts - 1))


async def try_record(recorder: SessionEndRecorder, ended: EndedSession, attempt: int) -> bool:
    """One delivery attempt; failures are logged (without traceback: history being down is expected)."""
    try:
        await recorder.record(ended)
    except (NotFound, InvalidArgument) as error:
        # The conversation is gone (deleted) or the record can never be valid: retrying cannot help.
        log.warning("not recording the end of session %s: %s", ended.session_id, error.message)
        return True
    except Exception as error:  # any other failure means "try again later", never "drop it"
        reason = error.message if isinstance(error, DuplexError) else repr(error)
        log.warning("recording the end of session %s failed (attempt %d): %s", ended.session_id, attempt, reason)
        return False
    log.info("recorded the end of session %s", ended.session_id)
    return True


def _timestamp(epoch_seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(epoch_seconds * 1e9))
    return stamp


class HistoryRecorder:
    """RecordSessionEnd on history_service, over its own channel (closed with `close`)."""

    def __init__(self, target: str, timeout: float = RECORD_TIMEOUT_SECONDS) -> None:
        self._channel = insecure_channel(target)
        self._stub = history_pb2_grpc.HistoryServiceStub(self._channel)
        self._timeout = timeout

    async def record(self, ended: EndedSession) -> None:
        request = history_pb2.RecordSessionEndRequest(
            user_id=ended.user_id,
            session_id=ended.session_id,
            conversation_id=ended.conversation_id,
            started_at=_timestamp(ended.started_at),
            ended_at=_timestamp(ended.ended_at),
        )
        try:
            await self._stub.RecordSessionEnd(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "history service") from None

    async def close(self) -> None:
        await self._channel.close()


# Returns how many seconds until it wants to run again, or None for "at the regular interval".
Work = Callable[[], Awaitable[float | None]]


class Housekeeper:
    """Runs `work` in the background: every `interval` seconds, sooner when the work asks for it (a retry
    coming due) or when `poke()` is called (a session just closed), never in a tight loop on failures."""

    def __init__(self, name: str, work: Work, interval: float) -> None:
        self._name = name
        self._work = work
        self._interval = interval
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            # Cancel until it has ended: on Python 3.11 a cancel landing just as an inner wait finishes can
            # be swallowed, and a single cancel then left stop() waiting forever (seen in the test suite).
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1)
            self._task = None

    def poke(self) -> None:
        self._poked.set()

    async def _run_forever(self) -> None:
        while True:
            delay = await self._run_once()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poked.wait()
            self._poked.clear()

    async def _run_once(self) -> float:
        try:
            wanted = await self._work()
        except DuplexError as error:
            # The store's backend may be down for a while: say so once per interval, without a traceback.
            log.warning("%s failed: %s", self._name, error.message)
            return self._interval
        except Exception:
            log.exception("%s failed", self._name)
            return self._interval
        if wanted is None:
            return self._interval
        return min(self._interval, max(0.0, wanted))
