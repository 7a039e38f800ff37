"""`duplex up`: the four services as separate processes talking gRPC on loopback.

Children run in their own process group, so a terminal's Ctrl-C reaches only this launcher, which then
stops them in order (gateway first) with SIGTERM, and SIGKILL only after a grace period.

A service that dies while the system runs is restarted (one line on stderr says which, how it ended and
when it comes back), with a delay that doubles from RESTART_FIRST_DELAY_SECONDS up to
RESTART_MAX_DELAY_SECONDS while it keeps crashing, and starts over once a run lasted
RESTART_RESET_AFTER_SECONDS. The others keep running. Nothing is restarted once a stop was asked for.
"""

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

from duplex.common.server import insecure_channel, is_serving

STOP_TIMEOUT_SECONDS = 15.0
RESTART_FIRST_DELAY_SECONDS = 0.5
RESTART_MAX_DELAY_SECONDS = 10.0
RESTART_RESET_AFTER_SECONDS = 30.0


@dataclass(frozen=True)
class ServiceSpec:
    module: str  # run as `python -m <module>`
    listen_env: str
    default_listen: str
    health_name: str


SERVICES = (
    ServiceSpec("llm_service", "DUPLEX_LLM_LISTEN", "127.0.0.1:50052", "duplex.llm.v1.LlmService"),
    ServiceSpec("session_service", "DUPLEX_SESSION_LISTEN", "127.0.0.1:50053", "duplex.session.v1.SessionService"),
    ServiceSpec("history_service", "DUPLEX_HISTORY_LISTEN", "127.0.0.1:50054", "duplex.history.v1.HistoryService"),
    ServiceSpec("gateway", "DUPLEX_GATEWAY_LISTEN", "127.0.0.1:50051", "duplex.chat.v1.ChatService"),
)
# The gateway dials each inner service where `duplex up` starts it, unless told otherwise.
TARGET_ENV = {
    "llm_service": "DUPLEX_LLM_TARGET",
    "session_service": "DUPLEX_SESSION_TARGET",
    "history_service": "DUPLEX_HISTORY_TARGET",
}


def listen_address(spec: ServiceSpec, env: dict[str, str]) -> str:
    return env.get(spec.listen_env, spec.default_listen)


def dial_address(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else listen


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for spec in SERVICES:
        if spec.module in TARGET_ENV:
            env.setdefault(TARGET_ENV[spec.module], dial_address(listen_address(spec, env)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


async def start(spec: ServiceSpec, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", spec.module, env=env, start_new_session=True
    )


async def wait_serving(spec: ServiceSpec, process: asyncio.subprocess.Process, env, timeout: float) -> None:
    channel = insecure_channel(dial_address(listen_address(spec, env)))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await is_serving(channel, spec.health_name, timeout=1.0):
            if process.returncode is not None:
                raise RuntimeError(f"{spec.module} exited with {describe_exit(process.returncode)}")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{spec.module} was not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await channel.close()


def describe_exit(returncode: int) -> str:
    """`exit code 1`, or `signal SIGKILL` for a process a signal ended (asyncio reports it as -signum)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Backoff:
    """The delay before the next restart: doubles per crash up to `maximum`, and starts over at `first`
    once a run lasted `reset_after` seconds."""

    def __init__(self, first: float = RESTART_FIRST_DELAY_SECONDS, maximum: float = RESTART_MAX_DELAY_SECONDS,
                 reset_after: float = RESTART_RESET_AFTER_SECONDS):
        self.first, self.maximum, self.reset_after = first, maximum, reset_after
        self._next = first

    def next_delay(self, ran_seconds: float) -> float:
        if ran_seconds >= self.reset_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


class Supervised:
    """One service's process, restarted whenever it dies until `stop` is set."""

    def __init__(self, spec: ServiceSpec, env: dict[str, str], process: asyncio.subprocess.Process,
                 stop: asyncio.Event, startup_timeout: float, backoff: Backoff | None = None):
        self.spec = spec
        self.process = process
        self._env = env
        self._stop = stop
        self._startup_timeout = startup_timeout
        self._backoff = backoff or Backoff()
        self.restarts = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        while True:
            if not await _until_or_stop(self.process.wait(), self._stop):
                return
            ran = loop.time() - started_at
            delay = self._backoff.next_delay(ran)
            print(
                f"duplex: {self.spec.module} (pid {self.process.pid}) exited with "
                f"{describe_exit(self.process.returncode)} after {ran:.1f}s; restarting it in {delay:.1f}s",
                file=sys.stderr, flush=True,
            )
            if not await _until_or_stop(asyncio.sleep(delay), self._stop):
                return
            self.process = await start(self.spec, self._env)
            self.restarts += 1
            started_at = loop.time()
            with contextlib.suppress(RuntimeError):  # it died again or is slow: the loop reports the exit
                if await _until_or_stop(
                    wait_serving(self.spec, self.process, self._env, self._startup_timeout), self._stop
                ):
                    print(f"duplex: {self.spec.module} (pid {self.process.pid}) is serving again",
                          file=sys.stderr, flush=True)


async def _until_or_stop(awaitable, stop: asyncio.Event) -> bool:
    """Await `awaitable` unless `stop` is set first (then cancel it). True if it finished; its error is raised."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if task.cancelled() or stop.is_set():
        return False
    if task.exception() is not None:
        raise task.exception()
    return True


async def stop_all(processes: list[tuple[ServiceSpec, asyncio.subprocess.Process]]) -> None:
    """SIGTERM in reverse start order (the gateway first, so turns still reach the inner services)."""
    for spec, process in reversed(processes):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                print(f"duplex: {spec.module} did not stop; killing it", file=sys.stderr)
                process.kill()
                await process.wait()


async def run_all(startup_timeout: float) -> int:
    env = child_environment()
    processes: list[tuple[ServiceSpec, asyncio.subprocess.Process]] = []
    supervised: list[Supervised] = []
    tasks: list[asyncio.Task] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for spec in SERVICES:
            process = await start(spec, env)
            processes.append((spec, process))
            if not await _until_or_stop(wait_serving(spec, process, env, startup_timeout), stop):
                return 130
        print_addresses(env)
        supervised = [Supervised(spec, env, process, stop, startup_timeout) for spec, process in processes]
        tasks = [asyncio.create_task(service.run()) for service in supervised]
        await asyncio.gather(*tasks)
        return 0
    except RuntimeError as error:
        print(f"duplex: {error}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        # Each supervisor returns once `stop` is set, with its service's current process in `.process`
        # (one being restarted right now included).
        await asyncio.gather(*tasks, return_exceptions=True)
        if supervised:
            processes = [(service.spec, service.process) for service in supervised]
        await stop_all(processes)
        print("duplex: all services stopped", file=sys.stderr)


def print_addresses(env: dict[str, str]) -> None:
    print("Duplex is running (Ctrl-C stops it):", flush=True)
    for spec in SERVICES:
        print(f"  {spec.module:<16} {listen_address(spec, env):<22} {spec.health_name}", flush=True)
    gateway = dial_address(listen_address(SERVICES[-1], env))
    web = env.get("DUPLEX_HTTP_LISTEN", "127.0.0.1:8080")
    if web:
        print(f"Web chat:      http://{dial_address(web)}/", flush=True)
    print(f"Chat with it:  duplex chat --target {gateway}", flush=True)
