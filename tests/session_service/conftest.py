"""Fixtures that start the real session_service on a free port and talk to it over a real channel.

Every test using `start_service` / `service` / `stub` runs three times: on the memory store, on Redis and on
a three-master Redis Cluster.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from duplex.common.server import GrpcServer
from duplex.history.v1 import history_pb2, history_pb2_grpc
from duplex.session.v1 import session_pb2_grpc
from session_service.server import create_server
from session_service.settings import SessionSettings
from tests.redis_fixtures import redis_cluster_key_prefix, redis_cluster_url, redis_key_prefix, redis_url
from tests.session_service.rpc_helpers import Follower

# fixtures, imported so pytest finds them here
__all__ = ["redis_cluster_key_prefix", "redis_cluster_url", "redis_key_prefix", "redis_url"]

# Explicit values, so DUPLEX_* variables in the environment cannot change what a test exercises.
DEFAULT_TEST_SETTINGS = {
    "session_ttl_seconds": 60.0,
    "session_log_max_events": 10_000,
    "turn_lease_seconds": 30.0,
    "shutdown_grace_seconds": 0.0,
    "quota_messages_per_minute": 30,
    "quota_tokens_per_day": 1_000_000,
    "quota_audio_seconds_per_day": 3600,
    "history_target": "",
    "session_end_retry_seconds": 0.1,
    "redis_url": None,
    "redis_cluster": False,
}

BACKENDS = ["memory", "redis", "redis-cluster"]


@dataclass
class RunningService:
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: session_pb2_grpc.SessionServiceStub


StartService = Callable[..., Awaitable[RunningService]]


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """The settings that select the backend under test; Redis only starts for the tests that need it."""
    if request.param == "memory":
        return {}
    if request.param == "redis-cluster":
        return {
            "redis_url": request.getfixturevalue("redis_cluster_url"),
            "redis_cluster": True,
            "redis_key_prefix": request.getfixturevalue("redis_cluster_key_prefix"),
        }
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_key_prefix": request.getfixturevalue("redis_key_prefix"),
    }


@pytest.fixture
async def start_service(backend_settings: dict[str, object]) -> AsyncIterator[StartService]:
    """Start a real server with setting overrides, e.g. `await start_service(turn_lease_seconds=0.2)`.
    Servers started in one test share the backend (with Redis: the same Redis and key prefix)."""
    running: list[RunningService] = []

    async def start(**overrides: object) -> RunningService:
        values = {**DEFAULT_TEST_SETTINGS, **backend_settings, **overrides}
        settings = SessionSettings(session_listen="127.0.0.1:0", **values)
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


@pytest.fixture
async def followers() -> AsyncIterator[Callable[..., Follower]]:
    """Start ReadEvents(follow=True) streams in the background; all are cancelled after the test."""
    started: list[Follower] = []

    def follow(stub, request) -> Follower:
        follower = Follower(stub, request)
        started.append(follower)
        return follower

    yield follow
    for follower in started:
        follower.cancel()
    await asyncio.gather(*(f.task for f in started), return_exceptions=True)


class FakeHistory(history_pb2_grpc.HistoryServiceServicer):
    """history_service's RecordSessionEnd on a real grpc.aio server: answers UNAVAILABLE to the first
    `failures` calls, records every call."""

    def __init__(self, failures: int = 0, failure_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures_left = failures
        self.failure_code = failure_code
        self.attempts: list[history_pb2.RecordSessionEndRequest] = []
        self.recorded: list[history_pb2.RecordSessionEndRequest] = []
        self._changed = asyncio.Condition()
        self.target = ""

    async def RecordSessionEnd(self, request, context):
        async with self._changed:
            self.attempts.append(request)
            self._changed.notify_all()
            if self.failures_left > 0:
                self.failures_left -= 1
                await context.abort(self.failure_code, "history refused")
            self.recorded.append(request)
            self._changed.notify_all()
        return history_pb2.RecordSessionEndResponse()

    def recorded_sessions(self) -> list[str]:
        return [request.session_id for request in self.recorded]

    async def wait_for_records(self, count: int, timeout: float = 3.0) -> None:
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.recorded) >= count)

        await asyncio.wait_for(enough(), timeout)


StartHistory = Callable[..., Awaitable[FakeHistory]]


@pytest.fixture
async def start_history() -> AsyncIterator[StartHistory]:
    servers: list[grpc.aio.Server] = []

    async def start(failures: int = 0, failure_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> FakeHistory:
        history = FakeHistory(failures, failure_code)
        server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        history_pb2_grpc.add_HistoryServiceServicer_to_server(history, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        history.target = f"127.0.0.1:{port}"
        return history

    yield start
    for server in servers:
        await server.stop(0)
