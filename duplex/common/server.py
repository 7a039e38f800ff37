"""Server bootstrap shared by every service: health, reflection, error mapping, graceful stop.

Each service's `create_server(settings, ...)` builds its dependencies and returns a started
`GrpcServer`; `python -m <service>` runs `serve()`, which waits for SIGTERM/SIGINT and stops it.
"""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duplex.common.errors import ErrorInterceptor
from duplex.common.settings import ServiceSettings

log = logging.getLogger(__name__)

# Enough concurrent streams for thousands of open chats per process (grpc stops at ~1.9k by default).
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)

Closer = Callable[[], Awaitable[None]]


# The health name a liveness probe asks: SERVING while the process runs and answers, whatever its
# dependencies do (a restart would not bring them back). Readiness asks the service's own name (and ""),
# SERVING only while its dependencies answer; both go NOT_SERVING once the server stops.
LIVENESS = "liveness"


class GrpcServer:
    """A grpc.aio server with health and reflection, and the resources it closes when it stops."""

    def __init__(self, service_names: Sequence[str], register: Callable[[grpc.aio.Server], None]):
        self.service_names = tuple(service_names)
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._closers: list[Closer] = []
        self._drainers: list[Closer] = []
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    def on_stop(self, closer: Closer) -> None:
        """Register a resource to close after the server stops; closed in reverse order."""
        self._closers.append(closer)

    def on_drain(self, drainer: Closer) -> None:
        """Register work to finish after the server reports NOT_SERVING and before it stops (within
        the grace period), such as running answers."""
        self._drainers.append(drainer)

    async def start(self, listen: str) -> int:
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {listen}")
        await self.server.start()
        await self.set_serving(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first (so balancers move new work away), then drain, then stop within `grace`."""
        await self.health.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + grace
        if self._drainers and grace > 0:
            drains = asyncio.gather(*(drainer() for drainer in self._drainers))
            try:
                await asyncio.wait_for(drains, grace)
            except TimeoutError:
                log.warning("drain did not finish within %.1fs; stopping anyway", grace)
        self._drainers.clear()
        await self.server.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("closing a resource failed")
        self._closers.clear()


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_service(main: Coroutine[Any, Any, None], settings: ServiceSettings) -> None:
    """Run a service's main coroutine to the end on the event loop its settings name."""
    loop_factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def serve_until_signal(server: GrpcServer, grace: float, name: str) -> None:
    log.info("%s listening on port %d", name, server.port)
    try:
        await wait_for_stop_signal()
        log.info("%s stopping (grace %.1fs)", name, grace)
    finally:
        await server.stop(grace)
    log.info("%s stopped", name)


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A channel to another Duplex service, with keepalive so dead peers are noticed, and reconnect
    attempts at most a second apart (grpc's default backoff grows to 120 s) so a restarted peer is found
    again within about a second; until then calls fail fast with UNAVAILABLE."""
    return grpc.aio.insecure_channel(
        target,
        options=(
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 1),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ),
    )


async def is_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 2.0) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    return False


async def wait_until_serving(channel: grpc.aio.Channel, service: str = "", timeout: float = 30.0) -> None:
    """Wait until the peer's health check says SERVING; TimeoutError after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await is_serving(channel, service):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{service or 'server'} did not become SERVING within {timeout:.0f}s")
        await asyncio.sleep(0.1)
