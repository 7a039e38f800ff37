"""Shared by the fault battery's load tests: systems on Redis and PostgreSQL with a second gateway, and
checks on what many clients saw."""

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc

from duplex.chat.v1 import chat_pb2, conversation_pb2, conversation_pb2_grpc
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
