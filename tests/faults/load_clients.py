"""Shared by the fault battery's load tests: systems on Redis and PostgreSQL with a second gateway, the
services as OS processes whose memory can be read, and checks on what many clients saw."""

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from duplex import launcher
from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from duplex.common.server import GrpcServer, wait_until_serving
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from history_service.server import create_server as create_history
from history_service.settings import HistorySettings
from llm_service.server import create_server as create_llm
from llm_service.settings import LlmSettings
from session_service.server import create_server as create_session
from session_service.settings import SessionSettings
from tests.conftest import LOOPBACK_ANY_PORT, System

CHAT_SERVICE = "duplex.chat.v1.ChatService"
UNLIMITED = {"quota_messages_per_minute": 0, "quota_tokens_per_day": 0, "quota_audio_seconds_per_day": 0}
UNLIMITED_ENV = {f"DUPLEX_{name.upper()}": "0" for name in UNLIMITED}


@dataclass
class Replicated:
    """A system and a second gateway B on the same stores. B has its own session service on Redis (as
    replicas do in production) and shares A's on the memory store (a memory store cannot be shared)."""

    system: System
    gateway_b: GrpcServer
    session_b: GrpcServer | None
    backend: str

    def target(self, gateway: str) -> str:
        server = self.system.gateway if gateway == "a" else self.gateway_b
        return f"127.0.0.1:{server.port}"

    async def stop(self) -> None:
        await self.gateway_b.stop(0)
        if self.session_b is not None:
            await self.session_b.stop(0)


async def start_system_on(
    data_dir: Path, tokens_per_second: float, redis: dict, database_url: str, **gateway_overrides
) -> System:
    """As tests.conftest.start_system, with the session service on Redis and history on PostgreSQL."""
    started: list[GrpcServer] = []
    try:
        llm = await create_llm(LlmSettings(
            llm_listen=LOOPBACK_ANY_PORT, local_tokens_per_second=tokens_per_second, llm_coalesce_window_ms=0,
            openai_api_key=None,
        ))
        started.append(llm)
        history = await create_history(HistorySettings(
            history_listen=LOOPBACK_ANY_PORT, data_dir=data_dir, database_url=database_url,
            llm_target=f"127.0.0.1:{llm.port}",
        ))
        started.append(history)
        session = await create_session(SessionSettings(
            session_listen=LOOPBACK_ANY_PORT, history_target=f"127.0.0.1:{history.port}", **redis, **UNLIMITED
        ))
        started.append(session)
        gateway = await create_gateway(GatewaySettings(
            gateway_listen=LOOPBACK_ANY_PORT, http_listen="", llm_target=f"127.0.0.1:{llm.port}",
            session_target=f"127.0.0.1:{session.port}", history_target=f"127.0.0.1:{history.port}",
            **gateway_overrides,
        ))
        started.append(gateway)
    except BaseException:
        for server in reversed(started):
            await server.stop(0)
        raise
    system = System(llm, session, history, gateway)
    await asyncio.wait_for(wait_until_serving(system.channel(gateway), CHAT_SERVICE), 10)
    return system


async def add_gateway(system: System, redis: dict, **gateway_overrides) -> Replicated:
    """A second gateway on the system's stores (see Replicated)."""
    session_b = None
    session_port = system.session.port
    if redis:
        session_b = await create_session(SessionSettings(
            session_listen=LOOPBACK_ANY_PORT, history_target=f"127.0.0.1:{system.history.port}", **redis, **UNLIMITED
        ))
        session_port = session_b.port
    gateway_b = await create_gateway(GatewaySettings(
        gateway_listen=LOOPBACK_ANY_PORT, http_listen="", llm_target=f"127.0.0.1:{system.llm.port}",
        session_target=f"127.0.0.1:{session_port}", history_target=f"127.0.0.1:{system.history.port}",
        **gateway_overrides,
    ))
    replicated = Replicated(system, gateway_b, session_b, "redis+postgres" if redis else "memory")
    await asyncio.wait_for(wait_until_serving(system.channel(gateway_b), CHAT_SERVICE), 10)
    return replicated


def logged(events: list[chat_pb2.ChatEvent]) -> list[chat_pb2.ChatEvent]:
    """The events of the session's log: without session_opened, the only ephemeral event these clients
    expect (a duplicate message_accepted, an error or a pong would show up as seq 0 and fail the checks)."""
    return [event for event in events if event.WhichOneof("kind") != "session_opened"]


def text_of(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(event.delta.text for event in events if event.WhichOneof("kind") == "delta")


def deltas(events: list[chat_pb2.ChatEvent]) -> int:
    return sum(event.WhichOneof("kind") == "delta" for event in events)


async def stored_messages(target: str, conversation_id: str, metadata=None) -> list[conversation_pb2.Message]:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await conversation_pb2_grpc.ConversationServiceStub(channel).GetConversation(
            conversation_pb2.GetConversationRequest(conversation_id=conversation_id), metadata=metadata, timeout=30
        )
    return list(reply.messages)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@dataclass
class Processes:
    """The four services as `python -m <module>` processes on free loopback ports, as `duplex up` runs
    them (memory session store, SQLite history in `data_dir`); `env` adds settings for every service."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    def pid(self, module: str) -> int:
        return self.processes[module].pid

    async def __aenter__(self) -> "Processes":
        self.ports = {spec.module: free_port() for spec in launcher.SERVICES}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DUPLEX_", "OPENAI_"))}
        base.update(
            DUPLEX_LLM_TARGET=f"127.0.0.1:{self.ports['llm_service']}",
            DUPLEX_SESSION_TARGET=f"127.0.0.1:{self.ports['session_service']}",
            DUPLEX_HISTORY_TARGET=f"127.0.0.1:{self.ports['history_service']}",
            DUPLEX_DATA_DIR=str(self.data_dir), DUPLEX_HTTP_LISTEN="", DUPLEX_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1", **UNLIMITED_ENV, **self.env,
        )
        try:
            for spec in launcher.SERVICES:  # llm, session, history, then the gateway
                env = {**base, spec.listen_env: f"127.0.0.1:{self.ports[spec.module]}"}
                process = await asyncio.create_subprocess_exec(sys.executable, "-m", spec.module, env=env)
                self.processes[spec.module] = process
                await launcher.wait_serving(spec, process, env, 60)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for process in reversed(list(self.processes.values())):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    def assert_running(self) -> None:
        for module, process in self.processes.items():
            assert process.returncode is None, f"{module} exited with {launcher.describe_exit(process.returncode)}"

    def rss_kib(self) -> dict[str, int]:
        return {module: rss_kib(process.pid) for module, process in self.processes.items()}

    def chat(self) -> tuple[grpc.aio.Channel, chat_pb2_grpc.ChatServiceStub]:
        channel = grpc.aio.insecure_channel(self.gateway)
        return channel, chat_pb2_grpc.ChatServiceStub(channel)

