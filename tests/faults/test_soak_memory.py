"""Soak: the four services as OS processes (memory session store, SQLite history, as `duplex up` runs them).

10,000 open -> message -> cancel cycles from 32 concurrent clients: no service's resident memory (VmRSS)
grows by 20 MB or more between the end of a 500-cycle warm-up and the end. Then 20 streams whose long
answers are never read while 10 normal clients run turns: the normal clients' time to first token stays
within 3x of a baseline measured just before, and the gateway's memory levels off once the bounded
buffers of the unread streams are full.
"""

import asyncio
import statistics
import time

import grpc
import pytest

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.session.v1 import session_pb2, session_pb2_grpc
from tests.faults.service_processes import ServiceProcesses, cpu_seconds
from tests.gateway.chat_helpers import ChatStream

pytestmark = pytest.mark.timeout(300)  # the 10,000 cycles take ~130 s here

MIB = 1024
CYCLES = 10_000
WARM_UP_CYCLES = 500
WORKERS = 32
MAX_GROWTH_KIB = 20 * MIB
SAMPLE_EVERY_CYCLES = 1000
READ_TIMEOUT_SECONDS = 30.0

# Each worker re-attaches to its own session every cycle, so what the stores keep by design (a session, its
# event log) is a fixed amount, reached in the warm-up: a log keeps at most 60 events (~8 per cycle).
SOAK_ENV = {
    "DUPLEX_LOCAL_TOKENS_PER_SECOND": "50",  # the first token after ~20 ms; a whole answer would take ~1 s
    "DUPLEX_SESSION_LOG_MAX_EVENTS": "60",
    "DUPLEX_SPEECH_PRELOAD": "false",
}


@pytest.fixture
async def soak_services(tmp_path):
    async with ServiceProcesses({"DUPLEX_DATA_DIR": str(tmp_path / "data"), **SOAK_ENV}) as services:
        yield services


class Counter:
    def __init__(self):
        self.started = 0
        self.done = 0
        self.ends: dict[str, int] = {}
        self.reached = asyncio.Condition()

    def take(self) -> bool:
        if self.started >= CYCLES:
            return False
        self.started += 1
        return True

    async def finished(self, end: str) -> None:
        self.ends[end] = self.ends.get(end, 0) + 1
        async with self.reached:
            self.done += 1
            self.reached.notify_all()

    async def wait_for(self, done: int) -> None:
        async with self.reached:
            await self.reached.wait_for(lambda: self.done >= done)


async def cycle(stub: chat_pb2_grpc.ChatServiceStub, session_id: str, n: int) -> tuple[str, str]:
    """Open a stream on the session, send a message, cancel its turn after the first delta, leave (half of
    the time half-closing and reading to the end, else cancelling the call). Returns the session's id and
    how the turn ended."""
    chat = ChatStream(stub)
    try:
        opened = await chat.open(session_id=session_id)  # empty: a new session
        await chat.say(f"cycle {n}")
        await chat.until("delta", timeout=READ_TIMEOUT_SECONDS)
        await chat.send(cancel=chat_pb2.Cancel())
        events = await chat.until_turn_ends(timeout=READ_TIMEOUT_SECONDS)
        if n % 2:
            await chat.half_close()
            assert await asyncio.wait_for(chat.call.read(), READ_TIMEOUT_SECONDS) is grpc.aio.EOF
        return opened.session_opened.session_id, events[-1].WhichOneof("kind")
    finally:
        chat.cancel()


async def worker(services: ServiceProcesses, counter: Counter) -> None:
    channel, stub = services.chat()
    session_id = ""
    async with channel:
        while counter.take():
            session_id, end = await cycle(stub, session_id, counter.started)
            await counter.finished(end)


async def test_ten_thousand_cycles_do_not_grow_any_services_memory(soak_services):
    services = soak_services
    counter = Counter()
    started = time.monotonic()
    workers = asyncio.gather(*(worker(services, counter) for _ in range(WORKERS)))
    samples: list[tuple[int, float, dict[str, int]]] = []
    try:
        for done in range(WARM_UP_CYCLES, CYCLES + 1, SAMPLE_EVERY_CYCLES):
            await asyncio.wait_for(counter.wait_for(done), 120)
            samples.append((done, time.monotonic() - started, services.rss_kib()))
        await asyncio.wait_for(workers, 120)
    finally:
        workers.cancel()
    elapsed = time.monotonic() - started
    end = services.rss_kib()
    services.assert_running()
    cpu = {module: cpu_seconds(services.pid(module)) for module in services.processes}

    warm = samples[0]
    rate = (CYCLES - warm[0]) / (elapsed - warm[1])
    growth = {module: end[module] - warm[2][module] for module in end}
    print(f"\n{CYCLES} cycles in {elapsed:.1f} s ({CYCLES / elapsed:.0f}/s overall, {rate:.0f}/s after the warm-up) "
          f"from {WORKERS} clients; turns ended {counter.ends}; CPU s {({m: round(s, 1) for m, s in cpu.items()})}")
    for module in end:
        trail = " ".join(f"{sample[2][module] / MIB:.1f}" for sample in samples)
        print(f"  {module}: RSS after warm-up {warm[2][module] / MIB:.1f} MiB, at the end {end[module] / MIB:.1f} MiB "
              f"(growth {growth[module] / MIB:+.1f} MiB); every {SAMPLE_EVERY_CYCLES} cycles: {trail}")
    assert counter.ends.get("turn_cancelled", 0) > CYCLES * 0.9, counter.ends  # the cycles did cancel
    assert set(counter.ends) <= {"turn_cancelled", "turn_completed"}, counter.ends
    grown = {module: f"{kib / MIB:.1f} MiB" for module, kib in growth.items() if kib >= MAX_GROWTH_KIB}
    assert grown == {}, f"resident memory grew by 20 MiB or more after the warm-up: {grown}"


# -- slow readers

SLOW_READERS = 20
NORMAL_CLIENTS = 10
BASELINE_TURNS = 4  # per normal client, before the slow readers start
SLOW_PHASE_SECONDS = 16.0
SAMPLE_SECONDS = 0.5
MAX_TTFT_RATIO = 3.0
# Every answer is far longer than the test (2000 tokens at 25 tokens/s, one event per token), so the unread
# streams keep producing. The gateway's per-session buffer and per-connection outbox are set small, so an
# unread stream fills its share within seconds (160 events at 25/s: ~6.5 s, half the phase): from then on a
# gateway whose buffers hold must level off, and one that keeps what nobody reads keeps growing (20 streams
# x 25 events/s x ~1 KiB each: ~0.5 MiB/s).
SLOW_ENV = {
    "DUPLEX_LOCAL_TOKENS_PER_SECOND": "75",
    "DUPLEX_LOCAL_MIN_REPLY_TOKENS": "5000",
    "DUPLEX_LLM_COALESCE_WINDOW_MS": "0",
    "DUPLEX_HUB_BUFFER_EVENTS": "128",
    "DUPLEX_CONNECTION_OUTBOX_EVENTS": "32",
    "DUPLEX_SESSION_LOG_MAX_EVENTS": "200",
    "DUPLEX_SHUTDOWN_GRACE_SECONDS": "1",
    "DUPLEX_SPEECH_PRELOAD": "false",
}
# The unread streams' fixed share: 20 x (128 + 32) events of ~1 KiB (a ChatEvent, its log copy, the
# framing), their answers so far (~6 bytes per token) and room for the allocator.
MAX_SLOW_GROWTH_KIB = 12 * MIB


@pytest.fixture
async def slow_services(tmp_path):
    async with ServiceProcesses({"DUPLEX_DATA_DIR": str(tmp_path / "data"), **SLOW_ENV}) as services:
        yield services


async def timed_turns(stub: chat_pb2_grpc.ChatServiceStub, turns: int | None, stop: asyncio.Event) -> list[float]:
    """Turns on one session: send, time to the first delta, cancel, read to the end. `turns` of them, or
    (None) until `stop` is set."""
    chat = ChatStream(stub)
    ttfts = []
    try:
        await chat.open()
        while (len(ttfts) < turns) if turns is not None else not stop.is_set():
            sent = time.monotonic()
            await chat.say(f"turn {len(ttfts)}")
            await chat.until("delta", timeout=READ_TIMEOUT_SECONDS)
            ttfts.append(time.monotonic() - sent)
            await chat.send(cancel=chat_pb2.Cancel())
            await chat.until_turn_ends(timeout=READ_TIMEOUT_SECONDS)
        return ttfts
    finally:
        chat.cancel()


async def start_unread(services: ServiceProcesses) -> tuple[grpc.aio.Channel, ChatStream, str]:
    """A stream that sends a message and reads nothing but its session's id (its own connection, as a
    stalled browser tab would have)."""
    channel, stub = services.chat()
    chat = ChatStream(stub)
    opened = await chat.open()
    await chat.say("a very long answer, please; I will not read it")
    return channel, chat, opened.session_opened.session_id


def ninetieth(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


async def test_unread_streams_do_not_slow_other_clients_or_grow_the_gateway_without_bound(slow_services):
    services = slow_services
    channels = [services.chat() for _ in range(NORMAL_CLIENTS)]
    stop = asyncio.Event()
    baseline = [t for ts in await asyncio.gather(*(timed_turns(stub, BASELINE_TURNS, stop) for _, stub in channels))
                for t in ts]

    before = services.rss_kib()["gateway"]
    unread = await asyncio.gather(*(start_unread(services) for _ in range(SLOW_READERS)))
    loaded = asyncio.gather(*(timed_turns(stub, None, stop) for _, stub in channels))
    samples = []
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < SLOW_PHASE_SECONDS:
            samples.append((elapsed, services.rss_kib()["gateway"]))
            await asyncio.sleep(SAMPLE_SECONDS)  # sampling memory over time: the measurement itself
    finally:
        stop.set()
    under_load = [t for ts in await asyncio.wait_for(loaded, 60) for t in ts]
    samples.append((time.monotonic() - started, services.rss_kib()["gateway"]))
    services.assert_running()

    # The unread streams' turns kept answering all along: their logs hold far more than anyone read.
    async with grpc.aio.insecure_channel(services.address("session_service")) as channel:
        store = session_pb2_grpc.SessionServiceStub(channel)
        sessions = [
            await store.GetSession(session_pb2.GetSessionRequest(user_id="local", session_id=session_id))
            for _, _, session_id in unread
        ]
        logged = [reply.session.last_seq for reply in sessions]
        async with grpc.aio.insecure_channel(services.gateway) as gateway:
            chat = chat_pb2_grpc.ChatServiceStub(gateway)
            cancelled = [
                (await chat.CancelTurn(chat_pb2.CancelTurnRequest(session_id=session_id))).cancelled
                for _, _, session_id in unread
            ]
    for channel, stream, _ in unread:
        stream.cancel()
        await channel.close()
    for channel, _ in channels:
        await channel.close()

    middle = next(rss for elapsed, rss in samples if elapsed >= SLOW_PHASE_SECONDS / 2)
    end = samples[-1][1]
    first_half, second_half = middle - before, end - middle
    ratio = statistics.median(under_load) / statistics.median(baseline)
    trail = " ".join(f"{rss / MIB:.1f}" for _, rss in samples[::4])
    print(
        f"\ntime to first token, p50/p90 ms: baseline {statistics.median(baseline) * 1000:.0f}/"
        f"{ninetieth(baseline) * 1000:.0f} ({len(baseline)} turns), with {SLOW_READERS} unread streams "
        f"{statistics.median(under_load) * 1000:.0f}/{ninetieth(under_load) * 1000:.0f} ({len(under_load)} turns): "
        f"p50 ratio {ratio:.2f}\ngateway RSS {before / MIB:.1f} MiB before the unread streams, "
        f"{middle / MIB:.1f} at half time, {end / MIB:.1f} at the end (first half {first_half / MIB:+.1f} MiB, "
        f"second half {second_half / MIB:+.1f} MiB); every 2 s: {trail}\n"
        f"events the unread streams' turns logged: min {min(logged)}, max {max(logged)}"
    )
    assert min(logged) > 200, f"the unread streams' turns did not keep answering: {logged}"
    assert all(cancelled), cancelled
    assert ratio < MAX_TTFT_RATIO, f"time to first token grew {ratio:.1f}x with {SLOW_READERS} unread streams"
    assert end - before < MAX_SLOW_GROWTH_KIB, f"the gateway grew {(end - before) / MIB:.1f} MiB"
    assert second_half <= max(first_half / 4, 2 * MIB), (
        f"the gateway kept growing: {first_half / MIB:+.1f} MiB in the first half, {second_half / MIB:+.1f} MiB in "
        "the second"
    )
