"""Answers history could not take when their turn ended, written again until it does.

A turn stores its answer once, as it ends. If history is down then, the answer is not dropped: it waits
here and is written again with backoff, which is safe because history stores a message once per
client_message_id ("turn:<id>"). The turn ends as usual and says the answer will be saved later, so
nobody sends the message again. What waits here lives in this process: a gateway that stops while
history is still down says how many answers it could not save.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from duplex.common.errors import DuplexError
from duplex.history.v1 import history_pb2
from gateway.clients import HistoryClient

log = logging.getLogger(__name__)

MAX_WAITING = 10_000  # answers; about 1 KB each, so a long history outage costs at most ~10 MB
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 10.0


@dataclass
class _Waiting:
    request: history_pb2.AppendMessageRequest
    retry_at: float
    delay: float = FIRST_RETRY_SECONDS


class DeferredWrites:
    def __init__(self, history: HistoryClient):
        self._history = history
        self._waiting: dict[str, _Waiting] = {}  # by client_message_id
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request: history_pb2.AppendMessageRequest) -> bool:
        """Write `request` later; False (not taken) when too many already wait."""
        if len(self._waiting) >= MAX_WAITING and request.client_message_id not in self._waiting:
            return False
        self._waiting[request.client_message_id] = _Waiting(request, time.monotonic() + FIRST_RETRY_SECONDS)
        self._changed.set()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_until_closed(), name="deferred-writes")

    async def close(self) -> None:
        """One last try for what waits; what history still refuses is reported lost."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self._write(key) for key in list(self._waiting)))
        if self._waiting:
            log.error("%d answer(s) not saved: history did not take them before this gateway stopped",
                      len(self._waiting))

    async def _write_until_closed(self) -> None:
        while True:
            now = time.monotonic()
            due = [key for key, waiting in self._waiting.items() if waiting.retry_at <= now]
            await asyncio.gather(*(self._write(key) for key in due))
            self._changed.clear()  # before looking, so an answer added from here on wakes the wait
            soonest = min((waiting.retry_at for waiting in self._waiting.values()), default=None)
            timeout = None if soonest is None else max(0.0, soonest - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _write(self, key: str) -> None:
        waiting = self._waiting[key]
        try:
            await self._history.append_message(waiting.request)
        except DuplexError as error:
            if not error.retryable:
                log.error("answer %s not saved: history refused it: %s", key, error.message)
                self._waiting.pop(key, None)
                return
            waiting.delay = min(waiting.delay * 2, MAX_RETRY_SECONDS)
            waiting.retry_at = time.monotonic() + waiting.delay
            return
        self._waiting.pop(key, None)
        log.info("answer %s saved once history was back", key)
