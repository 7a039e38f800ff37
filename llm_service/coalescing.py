"""Token coalescing: text chunks that arrive close together leave as one gRPC message.

A gRPC message costs tens of microseconds of CPU on each side, and upstream models send about one token
per chunk, so merging the chunks of a short window is the cheapest way to serve many streams at once.
The rules, so coalescing never costs latency a person could notice:

- the first text chunk, and any chunk arriving a full window after the last send, goes out at once;
- chunks arriving sooner are held and leave together when the window since the last send is over;
- anything else (a tool call, the finish) first flushes what is held, then goes out itself.
"""

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import Enum

from llm_service.providers.base import Chunk, StreamItem

# Held text is sent early once it reaches this size, so no message grows large.
MAX_HELD_CHARS = 16_384
# How far the reading task may run ahead of the sender.
MAX_ITEMS_AHEAD = 8


async def coalesce_chunks(
    items: AsyncGenerator[StreamItem, None], window_seconds: float
) -> AsyncGenerator[StreamItem, None]:
    """`items` with its text chunks merged per window; `window_seconds` <= 0 passes everything through."""
    if window_seconds <= 0:
        async with contextlib.aclosing(items):
            async for passing in items:
                yield passing
        return
    async with _Pump(items) as pump:
        held = _Held()
        last_sent = -float("inf")
        loop = asyncio.get_running_loop()
        while True:
            item = await pump.next_before(last_sent + window_seconds if held else None)
            if item is _Signal.END:
                break
            if item is _Signal.WINDOW_OVER:
                yield held.take()
                last_sent = loop.time()
            elif isinstance(item, Chunk):
                if held or loop.time() < last_sent + window_seconds:
                    held.add(item)
                    if held.full:  # a very fast source: no message grows large
                        yield held.take()
                        last_sent = loop.time()
                else:
                    yield item
                    last_sent = loop.time()
            else:
                if held:
                    yield held.take()
                    last_sent = loop.time()
                yield item
        if held:
            yield held.take()


class _Held:
    """The chunks waiting for the window to end."""

    def __init__(self) -> None:
        self._chunks: list[Chunk] = []
        self._chars = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    @property
    def full(self) -> bool:
        return self._chars >= MAX_HELD_CHARS

    def add(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._chars += len(chunk.text)

    def take(self) -> Chunk:
        """The held chunks as one, emptying the hold."""
        chunks, self._chunks, self._chars = self._chunks, [], 0
        return merge(chunks)


def merge(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(
        text="".join(chunk.text for chunk in chunks),
        token_count=sum(chunk.token_count for chunk in chunks),
        produced_at_ns=chunks[0].produced_at_ns,
    )


class _Signal(Enum):
    WINDOW_OVER = "window over"
    END = "end"


@dataclass(frozen=True, slots=True)
class _Failure:
    error: Exception


class _Pump:
    """Reads the stream in a task of its own into a short queue, so the reader can wait with a timeout.

    A timeout on the stream itself would cancel the provider mid-request; a timeout on the queue cancels
    nothing. One task per stream, not one per item: an item costs a queue put and get. The queue is short,
    so a client that stops reading still stops the provider after a few items (gRPC flow control).
    """

    def __init__(self, items: AsyncGenerator[StreamItem, None]):
        self._items = items
        self._queue: asyncio.Queue[StreamItem | _Signal | _Failure] = asyncio.Queue(MAX_ITEMS_AHEAD)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "_Pump":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stops the read in progress (the provider closes its upstream request), then closes the stream."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        await self._items.aclose()

    async def _run(self) -> None:
        try:
            async for item in self._items:
                await self._queue.put(item)
        except Exception as error:
            await self._queue.put(_Failure(error))
        else:
            await self._queue.put(_Signal.END)

    async def next_before(self, deadline: float | None) -> StreamItem | _Signal:
        """The next item, END after the last, or WINDOW_OVER when `deadline` (loop time) comes first."""
        try:
            entry = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout_at(deadline):
                    entry = await self._queue.get()
            except TimeoutError:
                return _Signal.WINDOW_OVER
        if isinstance(entry, _Failure):
            raise entry.error
        return entry
