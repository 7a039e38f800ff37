"""grpc-web for the unary and server-streaming methods of the public services, at POST /<package>.<Service>/<Method>.

Each call is proxied to this gateway's own native gRPC port over a loopback channel with raw-bytes
serializers, carrying the caller's `authorization` and `grpc-timeout`: authentication, validation, every
status and every event are exactly the native ones, and nothing here knows the messages.

Wire format (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md): the body is length-prefixed
frames, flag byte 0x00 for a message and 0x80 for the trailer block; the `-text` content types carry the
same bytes in base64. Each response message is written as its own frame as soon as it arrives, then the
trailers; a call that fails before any message answers trailers-only (grpc-status in the HTTP headers).
"""

import base64
import binascii
import contextlib
import logging
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf.descriptor import FileDescriptor

from duplex.common.errors import STATUS_DETAILS_KEY

log = logging.getLogger(__name__)

# Content type -> whether the body is base64 ("text" mode). `+proto` is the default message format.
CONTENT_TYPES = {
    "application/grpc-web": False,
    "application/grpc-web+proto": False,
    "application/grpc-web-text": True,
    "application/grpc-web-text+proto": True,
}
MESSAGE_FLAG = 0x00
COMPRESSED_FLAG = 0x01
TRAILER_FLAG = 0x80
FRAME_HEADER = struct.Struct(">BI")
# grpc-timeout: at most 8 digits and a unit (PROTOCOL-HTTP2.md).
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# grpc-message is percent-encoded: everything but printable ASCII, and "%" itself.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# Segments of a grpc-web-text body: clients may send several base64 chunks, each with its own padding.
_BASE64_SEGMENTS = re.compile(rb"[^=]*=*")


@dataclass(frozen=True)
class Method:
    path: str  # /<package>.<Service>/<Method>
    server_streaming: bool


class GrpcWebError(Exception):
    """A request this edge refuses with a grpc-web status, before any call is made."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class TooLarge(GrpcWebError):
    """A request over the message limit: refused with HTTP 413 and RESOURCE_EXHAUSTED, unread."""

    def __init__(self, max_message_bytes: int):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request is over the {max_message_bytes}-byte "
                         "message limit")


def callable_methods(files: Iterable[FileDescriptor], services: Iterable[str]) -> tuple[dict[str, Method], set[str]]:
    """The methods grpc-web can call (unary and server-streaming), and the client-streaming ones it cannot
    (browsers cannot stream a request body: grpc/grpc-web#735)."""
    wanted = set(services)
    callable_, client_streaming = {}, set()
    for file in files:
        for service in file.services_by_name.values():
            if service.full_name not in wanted:
                continue
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if method.client_streaming:
                    client_streaming.add(path)
                else:
                    callable_[path] = Method(path, method.server_streaming)
    return callable_, client_streaming


def frame(flag: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(flag, len(payload)) + payload


def body_limit(max_message_bytes: int, text: bool) -> int:
    """The largest body that can hold one frame of `max_message_bytes`: the frame, or its base64 (with
    room for a client that sends it in several padded chunks)."""
    framed = FRAME_HEADER.size + max_message_bytes
    return 4 * -(-framed // 3) + 64 if text else framed


def request_message(body: bytes, text: bool, max_message_bytes: int) -> bytes:
    """The one request message in a grpc-web body."""
    data = decode_text_body(body) if text else body
    if len(data) < FRAME_HEADER.size:
        raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "the request holds no complete message frame")
    flag, length = FRAME_HEADER.unpack_from(data)
    if flag & COMPRESSED_FLAG:
        raise GrpcWebError(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
    if flag != MESSAGE_FLAG:
        raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected frame flag 0x{flag:02x}")
    if length > max_message_bytes:
        raise TooLarge(max_message_bytes)
    if len(data) != FRAME_HEADER.size + length:
        raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "the request frame's length does not match its body")
    return data[FRAME_HEADER.size :]


def decode_text_body(body: bytes) -> bytes:
    try:
        segments = [segment for segment in _BASE64_SEGMENTS.findall(body.strip()) if segment]
        return b"".join(base64.b64decode(segment, validate=True) for segment in segments)
    except (binascii.Error, ValueError):
        raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "the request body is not valid base64") from None


def parse_timeout(value: str | None) -> float | None:
    if value is None:
        return None
    match = _TIMEOUT.match(value)
    if match is None:
        raise GrpcWebError(grpc.StatusCode.INVALID_ARGUMENT, "malformed grpc-timeout")
    return int(match[1]) * _TIMEOUT_UNIT_SECONDS[match[2]]


def percent_encode(message: str) -> str:
    return quote(message, safe=_MESSAGE_SAFE)


def status_fields(code: grpc.StatusCode, message: str, metadata: Iterable[tuple[str, str | bytes]] = ()) -> dict:
    """The status and the call's trailing metadata (binary values in base64), with the rich status
    (grpc-status-details-bin: RetryInfo, QuotaFailure) passed on as it came."""
    fields = {"grpc-status": str(code.value[0]), "grpc-message": percent_encode(message)}
    for key, value in metadata:
        if (key.startswith("grpc-") and key != STATUS_DETAILS_KEY) or key in fields:
            continue  # the status is ours to write
        fields[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return fields


def trailer_frame(fields: dict[str, str]) -> bytes:
    return frame(TRAILER_FLAG, "".join(f"{key}:{value}\r\n" for key, value in fields.items()).encode())


def too_large_response(error: TooLarge) -> web.Response:
    # 413 for HTTP clients and proxies, with the grpc-web status for grpc-web clients; the connection is
    # closed since the rest of the body is not read.
    fields = status_fields(error.code, error.message)
    return web.Response(status=413, headers={**fields, "Connection": "close"}, text=error.message + "\n")


class GrpcWebReply:
    """One grpc-web response: frames written as they come, in the request's encoding."""

    def __init__(self, request: web.Request, text: bool):
        self._request = request
        self._text = text
        self._response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/grpc-web-text+proto" if text else "application/grpc-web+proto"},
        )

    async def send(self, message: bytes) -> None:
        if not self._response.prepared:
            await self._response.prepare(self._request)
        await self._write(frame(MESSAGE_FLAG, message))

    async def finish(self, code: grpc.StatusCode, message: str, metadata=()) -> web.StreamResponse:
        fields = status_fields(code, message, metadata)
        if not self._response.prepared:
            # Trailers-only: nothing was sent, so the status travels in the HTTP headers.
            self._response.headers.update(fields)
            await self._response.prepare(self._request)
        else:
            await self._write(trailer_frame(fields))
        await self._response.write_eof()
        return self._response

    async def _write(self, data: bytes) -> None:
        # Each frame is base64'd on its own (with padding), which grpc-web-text readers accept; it keeps
        # every frame flushable the moment it is written.
        await self._response.write(base64.b64encode(data) if self._text else data)


class GrpcWebProxy:
    """Serves grpc-web by relaying each call to the native server over `channel`."""

    def __init__(
        self, channel: grpc.aio.Channel, methods: dict[str, Method], client_streaming: set[str], max_message_bytes: int
    ):
        self._channel = channel
        self._methods = methods
        self._client_streaming = client_streaming
        self._max_message_bytes = max_message_bytes
        self.active_calls = 0  # proxied calls in flight (tests check that a dropped request cancels its call)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        text = CONTENT_TYPES.get(request.content_type)
        if text is None:
            raise web.HTTPUnsupportedMediaType(text="expected an application/grpc-web content type\n")
        reply = GrpcWebReply(request, text)
        try:
            method = self._method(request.path)
            body = await self._read_body(request, body_limit(self._max_message_bytes, text))
            message = request_message(body, text, self._max_message_bytes)
            timeout = parse_timeout(request.headers.get("grpc-timeout"))
        except TooLarge as error:
            return too_large_response(error)
        except GrpcWebError as error:
            return await reply.finish(error.code, error.message)
        metadata = [("authorization", request.headers["Authorization"])] if "Authorization" in request.headers else []
        return await self._relay(method, message, metadata, timeout, reply)

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        """The body, refused unread when its declared length is over `limit` (a client that declares 1 GB
        and sends 3 bytes gets its answer at once) and as soon as more than `limit` bytes arrive."""
        if request.content_length is not None and request.content_length > limit:
            raise TooLarge(self._max_message_bytes)
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise TooLarge(self._max_message_bytes)
        return bytes(body)

    def _method(self, path: str) -> Method:
        if path in self._client_streaming:
            raise GrpcWebError(grpc.StatusCode.UNIMPLEMENTED, "client-streaming methods cannot be called over grpc-web")
        if path not in self._methods:
            raise GrpcWebError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}")
        return self._methods[path]

    async def _relay(self, method: Method, message: bytes, metadata, timeout, reply: GrpcWebReply):
        # No serializers: the request and response bytes pass through untouched.
        if method.server_streaming:
            call = self._channel.unary_stream(method.path)(message, metadata=metadata, timeout=timeout)
        else:
            call = self._channel.unary_unary(method.path)(message, metadata=metadata, timeout=timeout)
        self.active_calls += 1
        try:
            if method.server_streaming:
                async for response in call:
                    await reply.send(response)
            else:
                await reply.send(await call)
        except grpc.aio.AioRpcError as error:
            return await reply.finish(error.code(), error.details() or "", error.trailing_metadata() or ())
        finally:
            # A dropped HTTP request cancels this handler (handler_cancellation) and so the call upstream.
            call.cancel()
            self.active_calls -= 1
        return await reply.finish(grpc.StatusCode.OK, "", await _trailing_metadata(call))


async def _trailing_metadata(call) -> Iterable[tuple[str, str | bytes]]:
    with contextlib.suppress(grpc.aio.AioRpcError):
        return await call.trailing_metadata() or ()
    return ()
