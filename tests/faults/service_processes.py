"""The four services as OS processes, started as `duplex up` starts them (launcher.SERVICES specs, one
`python -m <module>` each, launcher.wait_serving), on free loopback ports. A fault test SIGKILLs one and
starts it again on the same port while the others keep running; a soak reads their memory. No Envoy:
clients talk to the gateway's native gRPC edge."""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from duplex import launcher
from duplex.chat.v1 import chat_pb2_grpc
from tests.faults.load_clients import UNLIMITED_ENV
from tests.redis_fixtures import free_port

SPECS = {spec.module: spec for spec in launcher.SERVICES}
INNER = ("llm_service", "session_service", "history_service")
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServiceProcesses:
    """llm_service, session_service, history_service and the gateway as processes, with no quotas. `env`
    adds settings for every service, `overrides` per module (its store, its pacing); every
    DUPLEX_*/OPENAI_* variable of the test's own environment is left out, so a developer's settings never
    leak in. Without overrides the stores are the embedded ones: memory sessions, SQLite in
    DUPLEX_DATA_DIR."""

    def __init__(self, env: dict[str, str] | None = None, overrides: dict[str, dict[str, str]] | None = None):
        self.ports = {module: free_port() for module in SPECS}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DUPLEX_", "OPENAI_"))}
        base.update({launcher.TARGET_ENV[module]: self.address(module) for module in INNER})
        base.update(DUPLEX_LOG_LEVEL="WARNING", DUPLEX_HTTP_LISTEN="", PYTHONUNBUFFERED="1", **UNLIMITED_ENV)
        base.update(env or {})
        self.env = {
            module: {**base, spec.listen_env: self.address(module), **(overrides or {}).get(module, {})}
            for module, spec in SPECS.items()
        }
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def address(self, module: str) -> str:
        return f"127.0.0.1:{self.ports[module]}"

    @property
    def gateway(self) -> str:
        return self.address("gateway")

    def pid(self, module: str) -> int:
        return self.processes[module].pid

    def rss_kib(self) -> dict[str, int]:
        return {module: rss_kib(process.pid) for module, process in self.processes.items()}

    def assert_running(self) -> None:
        for module, process in self.processes.items():
            assert process.returncode is None, f"{module} exited with {launcher.describe_exit(process.returncode)}"

    def chat(self) -> tuple[grpc.aio.Channel, chat_pb2_grpc.ChatServiceStub]:
        """A connection of its own to the gateway, and a ChatService stub on it; the caller closes it."""
        channel = grpc.aio.insecure_channel(self.gateway)
        return channel, chat_pb2_grpc.ChatServiceStub(channel)

    async def start(self, module: str) -> float:
        """Start `module` on its port; returns the seconds until it was SERVING."""
        started_at = time.monotonic()
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", module, env=self.env[module])
        self.processes[module] = process
        await launcher.wait_serving(SPECS[module], process, self.env[module], STARTUP_TIMEOUT_SECONDS)
        return time.monotonic() - started_at

    async def kill(self, module: str) -> float:
        """SIGKILL `module` (no goodbye, no flush) and wait until it is gone; returns when it was killed."""
        process = self.processes[module]
        process.kill()
        killed_at = time.monotonic()
        await process.wait()
        return killed_at

    async def __aenter__(self) -> "ServiceProcesses":
        try:
            async with asyncio.TaskGroup() as starting:  # one failing stops the others' waits
                for module in INNER:
                    starting.create_task(self.start(module))
            await self.start("gateway")  # SERVING only once the services behind it answer
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        """SIGTERM, the gateway first; SIGKILL what has not stopped in time."""
        for module in ("gateway", *reversed(INNER)):
            process = self.processes.get(module)
            if process is None or process.returncode is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
