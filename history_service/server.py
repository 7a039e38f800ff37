"""Entry points: create_server builds a started server (tests use port 0); main runs it until a signal.

Shaped like grpc's examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py, with the
signal handling and graceful stop in duplex.common.server.
"""

import asyncio

import grpc

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, serve_until_signal
from duplex.history.v1 import history_pb2_grpc
from history_service.database import (
    check_connection,
    create_database_engine,
    create_sessionmaker,
    create_tables,
)
from history_service.repository import HistoryRepository
from history_service.servicer import SERVICE_NAME, HistoryServicer
from history_service.settings import HistorySettings


async def create_server(settings: HistorySettings) -> GrpcServer:
    """A started server on settings.history_listen, SERVING once the database has answered."""
    engine = create_database_engine(settings.effective_database_url())
    try:
        await create_tables(engine)
        servicer = HistoryServicer(HistoryRepository(create_sessionmaker(engine)))
        server = GrpcServer([SERVICE_NAME], lambda grpc_server: _register(servicer, grpc_server))
        server.on_stop(engine.dispose)
        await server.start(settings.history_listen)
    except BaseException:
        await engine.dispose()
        raise
    try:
        await check_connection(engine)
    except BaseException:
        await server.stop(0)  # also disposes the engine
        raise
    await server.set_serving(True)
    return server


def _register(servicer: HistoryServicer, grpc_server: grpc.aio.Server) -> None:
    history_pb2_grpc.add_HistoryServiceServicer_to_server(servicer, grpc_server)


async def serve(settings: HistorySettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, "history_service")


def main() -> None:
    settings = HistorySettings()
    configure_logging(settings.log_level, "history")
    asyncio.run(serve(settings))
