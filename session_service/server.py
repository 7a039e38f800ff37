"""session_service's server: `python -m session_service` runs `main()`.

Shaped like grpc's examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py: build the
dependencies, register the servicer, start, report SERVING, wait for a signal, stop gracefully, close.
"""

import asyncio
import functools

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, serve_until_signal
from duplex.session.v1 import session_pb2, session_pb2_grpc
from session_service.servicer import SessionServicer
from session_service.settings import SessionSettings
from session_service.store import MemorySessionStore, SessionStore

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


def build_store(settings: SessionSettings) -> SessionStore:
    """The one place a backend is chosen; a Redis store will be selected here from settings."""
    return MemorySessionStore(
        ttl_seconds=settings.session_ttl_seconds,
        log_max_events=settings.session_log_max_events,
        turn_lease_seconds=settings.turn_lease_seconds,
    )


async def create_server(settings: SessionSettings) -> GrpcServer:
    """Build and start the server on settings.session_listen ("127.0.0.1:0" picks a port: see .port)."""
    store = build_store(settings)
    await store.start()
    servicer = SessionServicer(store)
    server = GrpcServer(
        [SERVICE_NAME], functools.partial(session_pb2_grpc.add_SessionServiceServicer_to_server, servicer)
    )
    server.on_stop(store.close)
    try:
        await server.start(settings.session_listen)
    except BaseException:
        await store.close()
        raise
    # The in-memory store has no dependency to wait for; it answers as soon as it exists.
    await server.set_serving(True)
    return server


async def serve(settings: SessionSettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, "session_service")


def main() -> None:
    settings = SessionSettings()
    configure_logging(settings.log_level, "session_service")
    asyncio.run(serve(settings))
