"""Token coalescing: on its own with a timed source, and through the server with the fake upstream."""

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from llm_helpers import collect, fake_model, openai_settings, request, user

from duplex.common.errors import Unavailable
from llm_service.coalescing import MAX_HELD_CHARS, coalesce_chunks
from llm_service.providers import Chunk, Finished, FinishReason, Started, StreamItem, ToolCall, ToolCallItem
from tests.fake_openai import FakeOpenAI, FakeReply

WINDOW = 0.05
STARTED = Started(model="m", prompt_tokens=1)
FINISHED = Finished(finish_reason=FinishReason.STOP, prompt_tokens=1, completion_tokens=1)


class TimedSource:
    """Yields each item after its pause (seconds); remembers whether it was closed."""

    def __init__(self, script: Sequence[tuple[float, StreamItem]]):
        self._script = script
        self.closed = False

    async def items(self) -> AsyncIterator[StreamItem]:
        try:
            for pause, item in self._script:
                if pause:
                    await asyncio.sleep(pause)
                yield item
        finally:
            self.closed = True


def chunk(text: str) -> Chunk:
    return Chunk(text=text, token_count=1)


async def received(source: TimedSource, window: float = WINDOW) -> list[tuple[float, StreamItem]]:
    """Each item coalesced, with when it came out (seconds since the start)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    return [(loop.time() - began, item) async for item in coalesce_chunks(source.items(), window)]


async def test_fast_chunks_are_merged_and_the_first_is_not_delayed():
    source = TimedSource([(0, STARTED), *[(0.001, chunk(f"{n} ")) for n in range(20)], (0, FINISHED)])

    out = await received(source)

    chunks = [(at, item) for at, item in out if isinstance(item, Chunk)]
    first_at, first = chunks[0]
    assert first == chunk("0 ") and first_at < 0.02
    assert len(chunks) < 10
    assert "".join(item.text for _, item in chunks) == "".join(f"{n} " for n in range(20))
    assert sum(item.token_count for _, item in chunks) == 20
    assert isinstance(out[0][1], Started) and out[-1][1] == FINISHED


async def test_held_text_leaves_when_the_window_ends_not_with_the_next_item():
    source = TimedSource([(0, STARTED), (0, chunk("a")), (0.005, chunk("b")), (0.4, chunk("c")), (0, FINISHED)])

    out = await received(source)

    times = {item.text: at for at, item in out if isinstance(item, Chunk)}
    assert set(times) == {"a", "b", "c"}
    # "b" waited for the window after "a", not for "c" 400 ms later.
    assert WINDOW * 0.9 <= times["b"] < WINDOW + 0.04


async def test_slow_chunks_pass_one_by_one_without_waiting():
    source = TimedSource([(0, STARTED), *[(WINDOW * 1.5, chunk(str(n))) for n in range(4)], (0, FINISHED)])

    out = await received(source)

    assert [item.text for _, item in out if isinstance(item, Chunk)] == ["0", "1", "2", "3"]


async def test_held_text_is_flushed_before_a_tool_call_and_before_finished():
    call = ToolCallItem(ToolCall(id="1", name="calculator", arguments_json="{}"))
    source = TimedSource([(0, STARTED), (0, chunk("a")), (0, chunk("b")), (0, call), (0, chunk("c")), (0, FINISHED)])

    out = [item for _, item in await received(source, window=10.0)]

    assert out == [STARTED, chunk("a"), chunk("b"), call, chunk("c"), FINISHED]


async def test_a_very_fast_source_never_makes_a_message_large():
    word = "x" * 99 + " "
    source = TimedSource([(0, STARTED), *[(0, chunk(word)) for _ in range(1000)], (0, FINISHED)])

    out = [item for _, item in await received(source, window=10.0)]

    sizes = [len(item.text) for item in out if isinstance(item, Chunk)]
    assert sum(sizes) == 100_000
    assert max(sizes) <= MAX_HELD_CHARS + len(word)
    assert len(sizes) < 15


async def test_a_failure_of_the_source_reaches_the_reader_after_what_came_before():
    async def failing() -> AsyncIterator[StreamItem]:
        yield STARTED
        yield chunk("a")
        raise Unavailable("upstream is down")

    seen = []
    with pytest.raises(Unavailable, match="upstream is down"):
        async for item in coalesce_chunks(failing(), WINDOW):
            seen.append(item)

    assert seen == [STARTED, chunk("a")]


async def test_a_zero_window_passes_every_item_through():
    script = [(0, STARTED), *[(0, chunk(str(n))) for n in range(10)], (0, FINISHED)]

    out = [item for _, item in await received(TimedSource(script), window=0)]

    assert out == [item for _, item in script]


@pytest.mark.parametrize("window", [0, WINDOW])
async def test_closing_the_stream_closes_the_source_even_with_a_read_in_progress(window: float):
    source = TimedSource([(0, STARTED), (0, chunk("a")), (0, chunk("b")), (60, chunk("never"))])
    stream = coalesce_chunks(source.items(), window)
    # With a window, "b" leaves when it ends, while the read of the next item is still in progress.
    assert [await anext(stream) for _ in range(3)] == [STARTED, chunk("a"), chunk("b")]

    await stream.aclose()

    assert source.closed


@pytest.mark.parametrize("window", [0, WINDOW])
async def test_cancelling_a_read_closes_the_source(window: float):
    source = TimedSource([(0, STARTED), (0, chunk("a")), (60, chunk("never"))])
    stream = coalesce_chunks(source.items(), window)
    assert [await anext(stream) for _ in range(2)] == [STARTED, chunk("a")]
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)

    reading.cancel()

    with pytest.raises(asyncio.CancelledError):
        await reading
    assert source.closed


@pytest.mark.parametrize(("window_ms", "most_messages"), [(0, 40), (60, 10)])
async def test_through_the_server(start_llm, fake_openai: FakeOpenAI, window_ms: float, most_messages: int):
    settings = openai_settings([fake_model(fake_openai)], llm_coalesce_window_ms=window_ms)
    running = await start_llm(settings)
    pieces = [f"w{n} " for n in range(40)]
    fake_openai.script(FakeReply(chunks=pieces, pace=0.002))

    reply = await collect(running.stub, request(user("Hi")))

    assert reply.text == "".join(pieces)
    assert sum(chunk.token_count for chunk in reply.chunks) == 40
    if window_ms == 0:
        assert len(reply.chunks) == 40  # one message per upstream chunk
    else:
        assert len(reply.chunks) <= most_messages
