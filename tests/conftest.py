"""Fixtures that start the real services in-process, each on port 0, talking over real channels."""

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from duplex.chat.v1 import chat_pb2_grpc
from duplex.common.server import GrpcServer, wait_until_serving
from duplex.history.v1 import history_pb2_grpc
from duplex.session.v1 import session_pb2_grpc
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from history_service.server import create_server as create_history
from history_service.settings import HistorySettings
from llm_service.server import create_server as create_llm
from llm_service.settings import LlmSettings
from session_service.server import create_server as create_session
from session_service.settings import SessionSettings

LOOPBACK_ANY_PORT = "127.0.0.1:0"


@dataclass
class System:
    """The four services, and stubs for the gateway and the stores behind it."""

    llm: GrpcServer
    session: GrpcServer
    history: GrpcServer
    gateway: GrpcServer
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, server: GrpcServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.channels.append(channel)
        return channel

    @property
    def chat(self) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(self.channel(self.gateway))

    @property
    def history_store(self) -> history_pb2_grpc.HistoryServiceStub:
        return history_pb2_grpc.HistoryServiceStub(self.channel(self.history))

    @property
    def session_store(self) -> session_pb2_grpc.SessionServiceStub:
        return session_pb2_grpc.SessionServiceStub(self.channel(self.session))

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in (self.gateway, self.llm, self.session, self.history):
            await server.stop(0)


async def start_system(
    data_dir: Path, tokens_per_second: float = 100.0, session_overrides: dict | None = None,
    llm_overrides: dict | None = None, **gateway_overrides
) -> System:
    # One message per token (no coalescing) so tests can count deltas; no real provider even if a developer
    # has OPENAI_API_KEY set.
    llm = await create_llm(LlmSettings(**{
        "llm_listen": LOOPBACK_ANY_PORT, "local_tokens_per_second": tokens_per_second,
        "llm_coalesce_window_ms": 0, "openai_api_key": None, **(llm_overrides or {}),
    }))
    history = await create_history(HistorySettings(
        history_listen=LOOPBACK_ANY_PORT, data_dir=data_dir, llm_target=f"127.0.0.1:{llm.port}"
    ))
    # Memory store (never a developer's Redis), unlimited quotas unless a test sets them.
    session = await create_session(SessionSettings(**{
        "session_listen": LOOPBACK_ANY_PORT, "history_target": f"127.0.0.1:{history.port}", "redis_url": None,
        "quota_messages_per_minute": 0, "quota_tokens_per_day": 0, "quota_audio_seconds_per_day": 0,
        **(session_overrides or {}),
    }))
    gateway_settings = GatewaySettings(
        gateway_listen=LOOPBACK_ANY_PORT,
        http_listen=LOOPBACK_ANY_PORT,
        llm_target=f"127.0.0.1:{llm.port}",
        session_target=f"127.0.0.1:{session.port}",
        history_target=f"127.0.0.1:{history.port}",
        **gateway_overrides,
    )
    gateway = await create_gateway(gateway_settings)
    system = System(llm, session, history, gateway)
    await asyncio.wait_for(wait_until_serving(system.channel(gateway), "duplex.chat.v1.ChatService"), 10)
    return system


@pytest.fixture
async def make_system(tmp_path):
    """Start a system with custom settings; everything started is stopped after the test."""
    started: list[System] = []

    async def make(**options) -> System:
        system = await start_system(tmp_path / f"data{len(started)}", **options)
        started.append(system)
        return system

    yield make
    for system in started:
        await system.stop()


@pytest.fixture
async def system(make_system) -> System:
    return await make_system()
