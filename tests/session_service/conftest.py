"""Fixtures that start the real session_service on a free port and talk to it over a real channel."""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from duplex.common.server import GrpcServer
from duplex.session.v1 import session_pb2_grpc
from session_service.server import create_server
from session_service.settings import SessionSettings

# Explicit values, so DUPLEX_* variables in the environment cannot change what a test exercises.
DEFAULT_TEST_SETTINGS = {
    "session_ttl_seconds": 60.0,
    "session_log_max_events": 10_000,
    "turn_lease_seconds": 30.0,
    "shutdown_grace_seconds": 0.0,
}


@dataclass
class RunningService:
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: session_pb2_grpc.SessionServiceStub


StartService = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start a real server with setting overrides, e.g. `await start_service(turn_lease_seconds=0.2)`."""
    running: list[RunningService] = []

    async def start(**overrides: float | int | str) -> RunningService:
        settings = SessionSettings(session_listen="127.0.0.1:0", **{**DEFAULT_TEST_SETTINGS, **overrides})
        server = await create_server(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        service = RunningService(server, channel, session_pb2_grpc.SessionServiceStub(channel))
        running.append(service)
        return service

    yield start
    for service in reversed(running):
        await service.channel.close()
        await service.server.stop(0)


@pytest.fixture
async def service(start_service: StartService) -> RunningService:
    return await start_service()


@pytest.fixture
def stub(service: RunningService) -> session_pb2_grpc.SessionServiceStub:
    return service.stub
