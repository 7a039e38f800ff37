"""Entry points: create_server builds a started server (tests use port 0); main runs it until a signal.

Shaped like grpc's examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py, with the
signal handling and graceful stop in duplex.common.server.
"""

import contextlib
import logging
from datetime import timedelta

import grpc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, insecure_channel, run_service, serve_until_signal
from duplex.common.settings import load_settings
from duplex.history.v1 import history_pb2_grpc
from duplex.llm.v1 import llm_pb2_grpc
from history_service.database import check_connection, create_database_engine, create_sessionmaker
from history_service.jobs import RUN_TIME_SHARE_OF_LEASE, JobQueue, JobWorker
from history_service.migrate import DatabaseNotMigrated, ensure_migrated
from history_service.repository import HistoryRepository
from history_service.search import MessageSearch
from history_service.servicer import SERVICE_NAME, HistoryServicer
from history_service.sessions import SUMMARIZE_SESSION, SessionRecords
from history_service.settings import HistorySettings
from history_service.summaries import SessionSummarizer

log = logging.getLogger(__name__)

EXIT_DATABASE_NOT_MIGRATED = 2


async def create_server(settings: HistorySettings) -> GrpcServer:
    """A started server on settings.history_listen, SERVING once the database has answered.

    Raises DatabaseNotMigrated when a configured database lacks this code's schema; the embedded SQLite
    default is migrated here instead.
    """
    async with contextlib.AsyncExitStack() as cleanup:
        engine = create_database_engine(settings.effective_database_url())
        cleanup.push_async_callback(engine.dispose)
        await ensure_migrated(settings, engine)
        sessionmaker = create_sessionmaker(engine)
        llm_channel = insecure_channel(settings.llm_target)
        cleanup.push_async_callback(llm_channel.close)
        worker = create_job_worker(settings, sessionmaker, llm_pb2_grpc.LlmServiceStub(llm_channel))
        servicer = HistoryServicer(
            HistoryRepository(sessionmaker),
            MessageSearch(sessionmaker),
            SessionRecords(sessionmaker),
            wake_job_worker=worker.poke,
        )
        server = GrpcServer([SERVICE_NAME], lambda grpc_server: _register(servicer, grpc_server))
        await server.start(settings.history_listen)
        # From here the server owns them; stop() closes them in reverse: writes in flight, worker, llm channel,
        # engine.
        for closer in (engine.dispose, llm_channel.close, worker.stop, servicer.writes.wait):
            server.on_stop(closer)
        cleanup.pop_all()
    try:
        await check_connection(engine)
        worker.start()
    except BaseException:
        await server.stop(0)
        raise
    await server.set_serving(True)
    return server


def create_job_worker(
    settings: HistorySettings, sessionmaker: async_sessionmaker[AsyncSession], llm: llm_pb2_grpc.LlmServiceStub
) -> JobWorker:
    lease = timedelta(seconds=settings.job_lease_seconds)
    summarizer = SessionSummarizer(
        SessionRecords(sessionmaker),
        HistoryRepository(sessionmaker),
        llm,
        model=settings.summary_model,
        timeout=lease.total_seconds() * RUN_TIME_SHARE_OF_LEASE,
    )
    return JobWorker(
        JobQueue(sessionmaker),
        {SUMMARIZE_SESSION: summarizer},
        worker_id=settings.worker_id,
        poll_interval=settings.job_poll_interval_seconds,
        lease=lease,
        max_attempts=settings.job_max_attempts,
        first_retry_delay=timedelta(seconds=settings.job_retry_backoff_seconds),
    )


def _register(servicer: HistoryServicer, grpc_server: grpc.aio.Server) -> None:
    history_pb2_grpc.add_HistoryServiceServicer_to_server(servicer, grpc_server)


async def serve(settings: HistorySettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, "history_service")


def main() -> None:
    settings = load_settings(HistorySettings, "history_service")
    configure_logging(settings.log_level, "history")
    try:
        run_service(serve(settings), settings)
    except DatabaseNotMigrated as error:
        # An operator's mistake, not a crash: one clear line, no traceback.
        log.error("%s", error)
        raise SystemExit(EXIT_DATABASE_NOT_MIGRATED) from None
