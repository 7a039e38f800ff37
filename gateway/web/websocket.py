"""The bidi Chat stream over a WebSocket at /v1/chat, served by the same ChatConnection as native gRPC.

Frames: a text frame carries one ChatRequest (client -> server) or one ChatResponse (server -> client) in
the proto3 JSON mapping; the server writes lowerCamelCase names, leaves out default values and writes 64-bit
integers (`seq`) as strings, and reads either name style. A binary frame carries the same message as binary
protobuf. The server answers in the encoding of the client's latest frame (JSON until the first binary one).
A binary frame whose first byte is 0x00 (never the first byte of a ChatRequest: field number 0 does not
exist) carries raw audio of the current utterance, in the session's voice input format, after that byte:
the cheap way to stream a microphone. It does not change the answer encoding.

Authentication, when on: offer `Sec-WebSocket-Protocol: duplex.v1, bearer.<jwt>` (a bad token is refused
with HTTP 401 before the upgrade; the server answers `duplex.v1`), or send as the first frame the text
`{"authorization": "Bearer <jwt>"}` (a missing or bad token closes with 4401). When the user is already
known (a header token, or auth off) such a first frame is skipped, so a client may always send it. Tokens
never go in the URL.

Close codes: 1000 normal · 1001 the gateway is stopping · 1002 protocol violation (such as an unmasked frame) ·
1009 a frame over DUPLEX_HTTP_MAX_MESSAGE_BYTES · 1011 internal error · 4401 unauthenticated · 4408 idle (no
frame either way for DUPLEX_WS_IDLE_TIMEOUT_SECONDS).
A closed socket is a disconnect, never a half-close: the running turn goes on; resume with `open` and
`resume_after_seq`.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import InvalidArgument, Unauthenticated, Unavailable
from gateway.auth import Authenticator, bearer_token
from gateway.chat import ChatConnection, ChatServicer
from gateway.settings import GatewaySettings
from gateway.web.strict_websocket import StrictWebSocketResponse

log = logging.getLogger(__name__)

SUBPROTOCOL = "duplex.v1"
BEARER_PROTOCOL_PREFIX = "bearer."
CLOSE_UNAUTHENTICATED = 4401
CLOSE_IDLE = 4408
CLOSE_REASON_MAX_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 for the code
ERROR_DETAIL_MAX_CHARS = 200
AUDIO_FRAME_MARKER = b"\x00"


class Disconnected(Exception):
    """The socket closed. Raised into ChatConnection so it stops as on a native disconnect."""


def token_from_protocols(header_values: list[str]) -> str | None:
    for value in header_values:
        for protocol in value.split(","):
            protocol = protocol.strip()
            if protocol.startswith(BEARER_PROTOCOL_PREFIX):
                return protocol[len(BEARER_PROTOCOL_PREFIX) :]
    return None


def token_from_auth_frame(message: WSMessage) -> str | None:
    """The token of an auth frame; None for any other frame."""
    frame = _auth_frame(message)
    return None if frame is None else bearer_token(frame["authorization"])


def _auth_frame(message: WSMessage) -> dict | None:
    if message.type is not WSMsgType.TEXT or '"authorization"' not in message.data:
        return None
    try:
        value = json.loads(message.data)
    except ValueError:
        return None
    is_auth = isinstance(value, dict) and value.keys() == {"authorization"} and isinstance(value["authorization"], str)
    return value if is_auth else None


def decode_request(message: WSMessage) -> chat_pb2.ChatRequest:
    """One frame as a ChatRequest; InvalidArgument says what is wrong with it."""
    request = chat_pb2.ChatRequest()
    try:
        if message.type is WSMsgType.BINARY:
            request.ParseFromString(message.data)
        elif not message.data.lstrip().startswith("{"):
            raise InvalidArgument("invalid frame: a text frame must hold one JSON object")
        else:
            json_format.Parse(message.data, request)
    except (json_format.Error, DecodeError, ValueError, TypeError, RecursionError) as error:
        detail = str(error).splitlines()[0][:ERROR_DETAIL_MAX_CHARS] if str(error) else type(error).__name__
        raise InvalidArgument(f"invalid frame: {detail}") from None
    return request


def encode_json(response: chat_pb2.ChatResponse) -> str:
    return json.dumps(json_format.MessageToDict(response), separators=(",", ":"), ensure_ascii=False)


async def close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    await ws.close(code=code, message=reason.encode()[:CLOSE_REASON_MAX_BYTES])


class SocketStream:
    """One accepted socket as ChatConnection sees it: a stream of ChatRequests and a write function."""

    def __init__(self, ws: web.WebSocketResponse, settings: GatewaySettings):
        self._ws = ws
        self._idle_timeout = settings.ws_idle_timeout_seconds
        self._binary = False  # the client's latest frame was binary protobuf
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()

    async def requests(self, connection: ChatConnection) -> AsyncIterator[chat_pb2.ChatRequest]:
        """Decoded frames until the socket closes. A frame that does not decode gets an error event and
        the stream goes on."""
        first = True
        while True:
            message = await self._receive()
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                raise Disconnected(f"socket {message.type.name.lower()}")
            # The user is already known: a leading token frame (a client that always sends one) is skipped.
            skip = first and _auth_frame(message) is not None
            first = False
            if skip:
                continue
            if message.type is WSMsgType.BINARY and message.data[:1] == AUDIO_FRAME_MARKER:
                yield chat_pb2.ChatRequest(audio=chat_pb2.AudioInput(data=message.data[1:]))
                continue
            self._binary = message.type is WSMsgType.BINARY
            try:
                request = decode_request(message)
            except InvalidArgument as error:
                await connection.reject(error)
                continue
            yield request

    async def write(self, response: chat_pb2.ChatResponse) -> None:
        if self._binary:
            await self._ws.send_bytes(response.SerializeToString())
        else:
            await self._ws.send_str(encode_json(response))
        self._last_activity = self._loop.time()

    async def _receive(self) -> WSMessage:
        """The next frame, closing the socket (4408) once nothing has moved either way for the idle timeout."""
        while True:
            remaining = self._idle_timeout - (self._loop.time() - self._last_activity)
            if remaining <= 0:
                await close(self._ws, CLOSE_IDLE, "idle timeout")
                raise Disconnected("idle")
            try:
                # Our own timeout: receive()'s restarts on every ping/pong, and heartbeats are not activity.
                async with asyncio.timeout(remaining):
                    message = await self._ws.receive()
            except TimeoutError:
                continue  # re-check: events written meanwhile count as activity
            self._last_activity = self._loop.time()
            return message


class ChatSocketHandler:
    """Serves /v1/chat. `open_sockets` lets the edge close every socket (1001) when the gateway stops."""

    def __init__(
        self, servicer: ChatServicer, identity: Authenticator, settings: GatewaySettings,
        open_sockets: set[web.WebSocketResponse],
    ):
        self._servicer = servicer
        self._identity = identity
        self._settings = settings
        self._open_sockets = open_sockets

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        header_token = token_from_protocols(request.headers.getall("Sec-WebSocket-Protocol", []))
        user_id = self._user_before_upgrade(header_token)
        ws = StrictWebSocketResponse(
            protocols=(SUBPROTOCOL,), max_msg_size=self._settings.http_max_message_bytes,
            heartbeat=self._settings.ws_heartbeat_seconds or None,
        )
        await ws.prepare(request)
        self._open_sockets.add(ws)
        try:
            if user_id is None:
                user_id = await self._user_from_first_frame(ws)
            if user_id is not None:
                await self._serve(ws, user_id)
        finally:
            self._open_sockets.discard(ws)
            await ws.close()
        return ws

    def _user_before_upgrade(self, header_token: str | None) -> str | None:
        """The user when the upgrade request settles it; None when a token frame must follow."""
        if header_token is None and self._identity.enabled:
            return None
        try:
            return self._identity.user_from_token(header_token)
        except Unauthenticated as error:
            raise web.HTTPUnauthorized(text=f"{error.message}\n") from None

    async def _user_from_first_frame(self, ws: web.WebSocketResponse) -> str | None:
        try:
            async with asyncio.timeout(self._settings.ws_auth_timeout_seconds):
                message = await ws.receive()
        except TimeoutError:
            await close(ws, CLOSE_UNAUTHENTICATED, "no token frame in time")
            return None
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return None  # closed, or a frame too big (already closed with 1009)
        try:
            return self._identity.user_from_token(token_from_auth_frame(message))
        except Unauthenticated as error:
            await close(ws, CLOSE_UNAUTHENTICATED, error.message)
            return None

    async def _serve(self, ws: web.WebSocketResponse, user_id: str) -> None:
        stream = SocketStream(ws, self._settings)
        connection = ChatConnection(self._servicer, user_id)
        try:
            await connection.run(stream.requests(connection), stream.write)
        except (Disconnected, ConnectionResetError):
            pass  # a disconnect: running turns go on
        except Unavailable as error:  # the gateway is draining; the last event said where to resume
            await close(ws, WSCloseCode.GOING_AWAY, error.message)
        except Exception:
            log.exception("WebSocket chat failed")
            await close(ws, WSCloseCode.INTERNAL_ERROR, "internal error")
