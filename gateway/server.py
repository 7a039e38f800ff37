"""`python -m gateway`: the public ChatService, wired to the llm, session and history services."""

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, insecure_channel, is_serving, run_service, serve_until_signal
from duplex.common.settings import ConfigurationError, exit_bad_configuration, load_settings
from gateway.auth import Authenticator
from gateway.cancels import CancelWatch
from gateway.chat import ChatServicer
from gateway.clients import HistoryClient, LlmClient, SessionClient
from gateway.conversations import ConversationServicer
from gateway.deferred_writes import DeferredWrites
from gateway.hub import HubRegistry
from gateway.settings import GatewaySettings
from gateway.tools import ToolRegistry, builtin_tools
from gateway.turn import Services, TurnManager
from gateway.voice import VoiceInputs
from gateway.web import start_web_edge

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    conversation_pb2.DESCRIPTOR.services_by_name["ConversationService"].full_name,
)
DEPENDENCIES = {
    "llm service": ("llm_target", "duplex.llm.v1.LlmService"),
    "session service": ("session_target", "duplex.session.v1.SessionService"),
    "history service": ("history_target", "duplex.history.v1.HistoryService"),
}


async def create_server(settings: GatewaySettings) -> GrpcServer:
    """Build and start the gateway; health turns SERVING once every inner service answers."""
    identity = Authenticator(settings)  # first: a key that cannot work stops start-up before anything opens
    identity.warn_if_disabled()
    channels = {name: insecure_channel(getattr(settings, field)) for name, (field, _) in DEPENDENCIES.items()}
    history = HistoryClient(channels["history service"], settings.rpc_timeout_seconds)
    services = Services(
        sessions=SessionClient(channels["session service"], settings.rpc_timeout_seconds),
        history=history,
        llm=LlmClient(channels["llm service"]),
        tools=ToolRegistry(builtin_tools(), settings.tool_timeout_seconds),
        deferred_writes=DeferredWrites(history),
    )
    owner = replica_id()
    hubs = HubRegistry(
        services.sessions, settings.hub_buffer_events, settings.event_flush_interval_seconds, owner,
        settings.turn_lease_renew_seconds, settings.hub_buffer_bytes, settings.session_log_outage_seconds,
    )
    turns = TurnManager(services, hubs, settings, owner)
    cancel_watch = CancelWatch(services.sessions, hubs, owner)
    voice_inputs = VoiceInputs(hubs, check_interval=max(1.0, settings.voice_input_idle_seconds / 4))
    chat = ChatServicer(services, hubs, turns, identity, settings, voice_inputs)
    conversations = ConversationServicer(services.history, identity)

    def register(server) -> None:
        chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
        conversation_pb2_grpc.add_ConversationServiceServicer_to_server(conversations, server)

    server = GrpcServer(SERVICE_NAMES, register)

    async def close_channels() -> None:
        for channel in channels.values():
            await channel.close()

    # Closed in reverse: the health watcher, then running turns (they still log and store), then the
    # event flusher's last flush, the watch for cancels from other replicas, then the channels they all use.
    server.on_stop(close_channels)
    server.on_stop(services.deferred_writes.close)  # after the turns: they may hand it their answers
    server.on_stop(cancel_watch.close)
    server.on_stop(hubs.close)
    server.on_stop(turns.close)
    server.on_stop(voice_inputs.close)  # first: no utterance starts a turn once turns are closing
    server.on_drain(chat.drain)
    await server.start(settings.gateway_listen)
    hubs.start()
    cancel_watch.start()
    services.deferred_writes.start()
    voice_inputs.start()
    try:
        # The browser edge (None when DUPLEX_HTTP_LISTEN is empty); `server.web.port` is its HTTP port.
        server.web = await start_web_edge(settings, chat, identity, server.port)
    except BaseException:
        await server.stop(0)
        raise
    if server.web is not None:
        server.on_stop(server.web.close)
    watcher = asyncio.create_task(_watch_dependencies(server, channels, settings), name="dependency-watch")
    server.on_stop(lambda: _cancel(watcher))
    return server


def replica_id() -> str:
    """Names this gateway process as the owner of the turns it runs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def _watch_dependencies(server: GrpcServer, channels: dict, settings: GatewaySettings) -> None:
    """SERVING only while every inner service reports SERVING; checked quickly until first ready."""
    serving = False
    while True:
        checks = [is_serving(channels[name], service) for name, (_, service) in DEPENDENCIES.items()]
        results = dict(zip(DEPENDENCIES, await asyncio.gather(*checks), strict=True))
        ready = all(results.values())
        if ready != serving:
            serving = ready
            await server.set_serving(ready)
            down = [name for name, ok in results.items() if not ok]
            log.info("gateway %s", "SERVING" if ready else f"NOT_SERVING: waiting for {', '.join(down)}")
        await asyncio.sleep(settings.dependency_check_interval_seconds if serving else 0.1)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: GatewaySettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, "gateway")


def main() -> None:
    settings = load_settings(GatewaySettings, "gateway")
    configure_logging(settings.log_level, "gateway")
    try:
        run_service(serve(settings), settings)
    except ConfigurationError as error:
        exit_bad_configuration("gateway", str(error))
