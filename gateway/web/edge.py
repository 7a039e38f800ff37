"""The HTTP edge: one aiohttp server in the gateway process, on the gRPC server's event loop.

Routes:
  GET  /                       the web chat page (static files under /static/)
  GET  /v1/chat                the Chat stream over WebSocket (websocket.py)
  POST /<package>.<Service>/<Method>   grpc-web for ChatService and ConversationService (grpcweb.py)
  GET  /v1/conversations       ListConversations as proto3 JSON, for the page (`Authorization: Bearer`)
  GET  /healthz                200 while the gateway's gRPC health is SERVING, else 503

grpc-web, /v1/conversations and /healthz go through a loopback channel to the gateway's own gRPC port, so
they behave exactly as native calls; the WebSocket drives ChatConnection directly.
"""

import logging
import socket
from pathlib import Path

import grpc
from aiohttp import WSCloseCode, web
from google.protobuf import json_format

from duplex.chat.v1 import chat_pb2, conversation_pb2, conversation_pb2_grpc
from duplex.common.server import insecure_channel, is_serving
from gateway.auth import Authenticator
from gateway.chat import ChatServicer
from gateway.settings import GatewaySettings
from gateway.web.grpcweb import GrpcWebProxy, callable_methods
from gateway.web.origins import OriginPolicy, own_origins
from gateway.web.websocket import ChatSocketHandler

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_SERVICES = ("duplex.chat.v1.ChatService", "duplex.chat.v1.ConversationService")
HEALTH_CHECK_TIMEOUT_SECONDS = 1.0
# The page loads only its own files and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
# HTTP statuses for the JSON endpoint's failures (the gRPC code travels in the body too).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def loopback_target(listen: str, port: int) -> str:
    """Where this process reaches its own gRPC server: the listen host, or loopback for a wildcard."""
    host, _ = split_listen(listen)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class WebEdge:
    """Owns the HTTP server, its loopback channel and its open WebSockets. `port` is the bound port."""

    def __init__(self, settings: GatewaySettings, chat: ChatServicer, identity: Authenticator, grpc_target: str):
        self._settings = settings
        self._chat = chat
        self._identity = identity
        self._channel = insecure_channel(grpc_target)
        self._open_sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.grpc_web = GrpcWebProxy(
            self._channel, *callable_methods(_public_files(), PUBLIC_SERVICES), settings.http_max_message_bytes
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> int:
        sock = bind(self._settings.http_listen)
        self.port = sock.getsockname()[1]
        origins = OriginPolicy(self._settings.allowed_origins or own_origins(self.port))
        self._runner = web.AppRunner(
            self._app(origins), handler_cancellation=True, access_log=None,
            shutdown_timeout=self._settings.shutdown_grace_seconds,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("web edge listening on %s (page, WebSocket /v1/chat, grpc-web)", self.url)
        return self.port

    def _app(self, origins: OriginPolicy) -> web.Application:
        # Room for one message frame, base64'd in grpc-web-text.
        app = web.Application(
            middlewares=[origins.middleware()], client_max_size=self._settings.http_max_message_bytes * 4 // 3 + 64
        )
        app.on_response_prepare.append(origins.on_response_prepare)
        app.on_shutdown.append(self._close_sockets)
        sockets = ChatSocketHandler(self._chat, self._identity, self._settings, self._open_sockets)
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC_DIR, append_version=False)
        app.router.add_get("/v1/chat", sockets.handle)
        app.router.add_get("/v1/conversations", self._conversations)
        app.router.add_get("/healthz", self._health)
        app.router.add_post("/{service}/{method}", self.grpc_web.handle)
        return app

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, closes sockets (1001), waits for handlers
            self._runner = None
        await self._channel.close()

    async def _close_sockets(self, _app: web.Application) -> None:
        for ws in list(self._open_sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the gateway is stopping")

    async def _page(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def _health(self, _request: web.Request) -> web.Response:
        serving = await is_serving(self._channel, PUBLIC_SERVICES[0], HEALTH_CHECK_TIMEOUT_SECONDS)
        return web.Response(status=200 if serving else 503, text="SERVING\n" if serving else "NOT_SERVING\n")

    async def _conversations(self, request: web.Request) -> web.Response:
        """ListConversations for the page, as proto3 JSON; `pageSize` and `pageToken` query parameters."""
        try:
            page = conversation_pb2.ListConversationsRequest(
                page_size=int(request.query.get("pageSize", "0")), page_token=request.query.get("pageToken", "")
            )
        except ValueError:
            return _json_error(grpc.StatusCode.INVALID_ARGUMENT, "pageSize must be a whole number")
        header = request.headers.get("Authorization")
        metadata = [("authorization", header)] if header else None
        stub = conversation_pb2_grpc.ConversationServiceStub(self._channel)
        try:
            reply = await stub.ListConversations(page, metadata=metadata, timeout=self._settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as error:
            return _json_error(error.code(), error.details() or "")
        return web.json_response(json_format.MessageToDict(reply), headers={"Cache-Control": "no-store"})


def _json_error(code: grpc.StatusCode, message: str) -> web.Response:
    body = {"code": code.value[0], "status": code.name, "message": message}
    return web.json_response(body, status=_HTTP_STATUS.get(code, 500), headers={"Cache-Control": "no-store"})


def _public_files():
    return (chat_pb2.DESCRIPTOR, conversation_pb2.DESCRIPTOR)


async def start_web_edge(
    settings: GatewaySettings, chat: ChatServicer, identity: Authenticator, grpc_port: int
) -> WebEdge | None:
    """Start the edge on DUPLEX_HTTP_LISTEN (None when that is empty)."""
    if not settings.http_listen:
        return None
    edge = WebEdge(settings, chat, identity, loopback_target(settings.gateway_listen, grpc_port))
    try:
        await edge.start()
    except BaseException:
        await edge.close()
        raise
    return edge
