"""`duplex up`: the four services as separate processes talking gRPC on loopback.

Children run in their own process group, so a terminal's Ctrl-C reaches only this launcher, which then
stops them in order (gateway first) with SIGTERM, and SIGKILL only after a grace period.
"""

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass

from duplex.common.server import insecure_channel, is_serving

STOP_TIMEOUT_SECONDS = 15.0


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
                raise RuntimeError(f"{spec.module} exited with code {process.returncode}")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{spec.module} was not SERVING after {timeout:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await channel.close()


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for spec in SERVICES:
            process = await start(spec, env)
            processes.append((spec, process))
            await _wait_or_stop(wait_serving(spec, process, env, startup_timeout), stop)
        if stop.is_set():
            return 130
        print_addresses(env)
        exited = await _wait_for_exit_or_stop(processes, stop)
        if exited is not None:
            print(f"duplex: {exited.module} stopped unexpectedly; stopping the rest", file=sys.stderr)
            return 1
        return 0
    except RuntimeError as error:
        print(f"duplex: {error}", file=sys.stderr)
        return 1
    finally:
        await stop_all(processes)
        print("duplex: all services stopped", file=sys.stderr)


async def _wait_or_stop(waiting, stop: asyncio.Event) -> None:
    task = asyncio.create_task(waiting)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()


async def _wait_for_exit_or_stop(processes, stop: asyncio.Event) -> ServiceSpec | None:
    waits = {asyncio.create_task(process.wait()): spec for spec, process in processes}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (*waits, stopper):
        task.cancel()
    await asyncio.gather(*waits, stopper, return_exceptions=True)
    exited = [waits[task] for task in done if task in waits]
    return exited[0] if exited and not stop.is_set() else None


def print_addresses(env: dict[str, str]) -> None:
    print("Duplex is running (Ctrl-C stops it):", flush=True)
    for spec in SERVICES:
        print(f"  {spec.module:<16} {listen_address(spec, env):<22} {spec.health_name}", flush=True)
    gateway = dial_address(listen_address(SERVICES[-1], env))
    web = env.get("DUPLEX_HTTP_LISTEN", "127.0.0.1:8080")
    if web:
        print(f"Web chat:      http://{dial_address(web)}/", flush=True)
    print(f"Chat with it:  duplex chat --target {gateway}", flush=True)
