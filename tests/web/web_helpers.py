"""Clients for the browser edge: a WebSocket chat client speaking proto3 JSON frames, grpc-web framing, and
JWTs for a gateway with auth on."""

import asyncio
import base64
import json
import struct
import time
import uuid
from pathlib import Path

import aiohttp
import jwt
from google.protobuf import json_format

from duplex.chat.v1 import chat_pb2

SECRET = "web-edge-test-secret-that-is-long-enough"
# The browser tests' Chromium (Debian's; Playwright never downloads one here) and its flags.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# These tests often end the moment a turn ends, while the turn still titles its conversation in history.
# Stopping everything right then cancels that write mid-commit, and the history service's SQLite connection
# then never finishes closing (a history_service shutdown race that hangs the event loop's close), so a
# system gets this long to finish its background writes before it stops.
SETTLE_SECONDS = 0.2
TERMINAL = ("turnCompleted", "turnCancelled", "error")
EVENT_KINDS = (
    "sessionOpened", "messageAccepted", "turnStarted", "delta", "toolCall", "toolResult", "turnCompleted",
    "turnCancelled", "error", "pong", "quota", "speechStarted", "speechStopped", "transcript", "audio",
    "sessionUpdated",
)


def web_url(system, path: str = "") -> str:
    return f"http://127.0.0.1:{system.gateway.web.port}{path}"


def token(user: str = "alice", key: str = SECRET, algorithm: str = "HS256", **claims) -> str:
    now = int(time.time())
    base = {"sub": user, "aud": "duplex", "iss": "duplex", "iat": now, "exp": now + 300}
    return jwt.encode({**base, **claims}, key, algorithm=algorithm)


def kind(event: dict) -> str:
    return next(name for name in EVENT_KINDS if name in event)


def text_of(events: list[dict]) -> str:
    return "".join(event["delta"].get("text", "") for event in events if kind(event) == "delta")


class SocketChat:
    """One /v1/chat WebSocket, decoded: `next_event` returns the event of a ChatResponse as a dict (JSON
    frames as sent, binary frames through json_format so both look the same)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frame_types: list[aiohttp.WSMsgType] = []
        self.raw_text: list[str] = []
        self.close_reason = ""

    async def send(self, request: dict) -> None:
        await self.ws.send_str(json.dumps(request))

    async def send_binary(self, request: chat_pb2.ChatRequest) -> None:
        await self.ws.send_bytes(request.SerializeToString())

    async def next_event(self, timeout: float = 10.0) -> dict:
        message = await asyncio.wait_for(self.ws.receive(), timeout)
        self.frame_types.append(message.type)
        if message.type is aiohttp.WSMsgType.TEXT:
            self.raw_text.append(message.data)
            return json.loads(message.data)["event"]
        assert message.type is aiohttp.WSMsgType.BINARY, f"the socket closed: {message}"
        return json_format.MessageToDict(chat_pb2.ChatResponse.FromString(message.data))["event"]

    async def open(self, **fields) -> dict:
        await self.send({"open": fields})
        event = await self.next_event()
        assert kind(event) == "sessionOpened", event
        return event["sessionOpened"]

    async def say(self, text: str, client_message_id: str | None = None) -> str:
        message_id = client_message_id or uuid.uuid4().hex
        await self.send({"message": {"clientMessageId": message_id, "text": text}})
        return message_id

    async def until(self, *kinds: str, timeout: float = 15.0) -> list[dict]:
        events = []
        while not events or kind(events[-1]) not in kinds:
            events.append(await self.next_event(timeout))
        return events

    async def until_turn_ends(self, timeout: float = 15.0) -> list[dict]:
        events = []
        while not events or not (kind(events[-1]) in TERMINAL and events[-1].get("turnId")):
            events.append(await self.next_event(timeout))
        return events

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes the socket; its close code."""
        while True:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                self.close_reason = message.extra or ""
                return self.ws.close_code


# --- grpc-web ---

GRPC_WEB = "application/grpc-web+proto"
GRPC_WEB_TEXT = "application/grpc-web-text+proto"


def grpc_web_body(message, content_type: str = GRPC_WEB) -> bytes:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    framed = struct.pack(">BI", 0, len(payload)) + payload
    return base64.b64encode(framed) if "text" in content_type else framed


def decode_grpc_web(body: bytes, content_type: str) -> tuple[list[bytes], dict[str, str]]:
    """The messages and the trailers of a whole grpc-web response body."""
    data = decode_text(body) if "text" in content_type else body
    messages, trailers = [], {}
    while data:
        flag, length = struct.unpack(">BI", data[:5])
        payload, data = data[5 : 5 + length], data[5 + length :]
        assert len(payload) == length, "truncated frame"
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def decode_text(body: bytes) -> bytes:
    """grpc-web-text: concatenated base64 chunks, each with its own padding."""
    out, chunk = b"", b""
    for byte in body:
        chunk += bytes([byte])
        if len(chunk) == 4:
            out += base64.b64decode(chunk)
            chunk = b""
    assert not chunk, "base64 body of a bad length"
    return out


def status_of(response: aiohttp.ClientResponse, trailers: dict[str, str]) -> int:
    """grpc-status from the trailers, or from the headers of a trailers-only response."""
    return int(trailers.get("grpc-status", response.headers.get("grpc-status", "-1")))
