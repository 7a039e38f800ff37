"""session_service's server: `python -m session_service` runs `main()`.

Shaped like grpc's examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py: build the
dependencies, register the servicer, start, report SERVING once the store answers, wait for a signal, stop
gracefully, close.
"""

import asyncio
import contextlib
import functools
import logging

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, run_service, serve_until_signal
from duplex.common.settings import load_settings
from duplex.session.v1 import session_pb2, session_pb2_grpc
from session_service.quota import QuotaLimits
from session_service.redis_store import RedisSessionStore, connect, redact_url
from session_service.servicer import SessionServicer
from session_service.session_end import HistoryRecorder
from session_service.settings import SessionSettings
from session_service.store import MemorySessionStore, SessionStore

log = logging.getLogger(__name__)

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
# Until the store first answers, health is re-checked quickly; after that, at a calm pace.
READY_RECHECK_SECONDS = 0.2
SERVING_RECHECK_SECONDS = 5.0


def build_store(settings: SessionSettings, recorder: HistoryRecorder | None = None) -> SessionStore:
    """The one place a backend is chosen: Redis when DUPLEX_REDIS_URL is set, memory otherwise."""
    common = {
        "ttl_seconds": settings.session_ttl_seconds,
        "log_max_events": settings.session_log_max_events,
        "turn_lease_seconds": settings.turn_lease_seconds,
        "quota_limits": QuotaLimits(
            settings.quota_messages_per_minute, settings.quota_tokens_per_day, settings.quota_audio_seconds_per_day
        ),
        "recorder": recorder,
        "end_retry_seconds": settings.session_end_retry_seconds,
    }
    if settings.redis_url is None:
        log.info("session store: in memory")
        return MemorySessionStore(**common)
    url = settings.redis_url.get_secret_value()
    kind = "redis cluster" if settings.redis_cluster else "redis"
    log.info("session store: %s at %s, key prefix %r", kind, redact_url(url), settings.redis_key_prefix)
    client = connect(url, cluster=settings.redis_cluster)
    return RedisSessionStore(client, key_prefix=settings.redis_key_prefix, **common)


def build_recorder(settings: SessionSettings) -> HistoryRecorder | None:
    if not settings.history_target:
        log.info("recording session ends: disabled")
        return None
    return HistoryRecorder(settings.history_target)


async def create_server(settings: SessionSettings) -> GrpcServer:
    """Build and start the server on settings.session_listen ("127.0.0.1:0" picks a port: see .port)."""
    recorder = build_recorder(settings)
    store = build_store(settings, recorder)
    servicer = SessionServicer(store)
    server = GrpcServer(
        [SERVICE_NAME], functools.partial(session_pb2_grpc.add_SessionServiceServicer_to_server, servicer)
    )
    # Closed in reverse: the health watcher, then the store (its sweeper still records), then the recorder.
    if recorder is not None:
        server.on_stop(recorder.close)
    server.on_stop(store.close)
    try:
        await store.start()
        await server.start(settings.session_listen)
    except BaseException:
        await store.close()
        if recorder is not None:
            await recorder.close()
        raise
    # One check before returning, so a store that answers right away serves right away; history_service
    # is not a dependency for serving (recording ends retries on its own).
    serving = await store.is_ready()
    await server.set_serving(serving)
    watcher = asyncio.create_task(_watch_store(server, store, serving), name="session-store-watch")
    server.on_stop(lambda: _cancel(watcher))
    return server


async def _watch_store(server: GrpcServer, store: SessionStore, serving: bool) -> None:
    """SERVING exactly while the store answers."""
    while True:
        await asyncio.sleep(SERVING_RECHECK_SECONDS if serving else READY_RECHECK_SECONDS)
        ready = await store.is_ready()
        if ready != serving:
            serving = ready
            await server.set_serving(ready)
            log.info("session_service %s", "SERVING" if ready else "NOT_SERVING: the session store does not answer")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: SessionSettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, "session_service")


def main() -> None:
    settings = load_settings(SessionSettings, "session_service")
    configure_logging(settings.log_level, "session_service")
    run_service(serve(settings), settings)
