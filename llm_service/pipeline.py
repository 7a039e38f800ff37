"""The shape both speech calls share: worker tasks feeding one bounded queue, read by the call itself.

Each worker is a coroutine; the call's async generator yields what they put on the queue until one of
them puts END. A worker that fails ends the call with its error. However the call ends (done, failed,
cancelled by the client, closed), the workers are cancelled and awaited before the generator returns,
so nothing it started outlives it.
"""

import asyncio
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

# What the last worker puts on the queue when the call's output is complete.
END = object()


@dataclass(frozen=True, slots=True)
class Failure:
    error: Exception


async def run_workers(queue: asyncio.Queue, workers: Sequence[Coroutine[Any, Any, None]]) -> AsyncGenerator[Any, None]:
    async def guarded(worker: Coroutine[Any, Any, None]) -> None:
        try:
            await worker
        except Exception as error:
            await queue.put(Failure(error))

    tasks = [asyncio.create_task(guarded(worker)) for worker in workers]
    try:
        while True:
            item = await queue.get()
            if item is END:
                return
            if isinstance(item, Failure):
                raise item.error
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
