"""A raw grpc-web client (binary framing, PROTOCOL-WEB.md) over plain HTTP/1.1, as a browser would send it.

Each response frame is timestamped on arrival, so tests can tell a streamed answer from a buffered one.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote

import aiohttp
from google.protobuf.message import Message

GRPC_WEB_HEADERS = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "x-user-agent": "duplex-test"}
TRAILER_FLAG = 0x80


@dataclass
class GrpcWebReply:
    headers: dict[str, str]
    messages: list[Message] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)  # loop time of each message
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> int:
        # A call that fails before any message may put its status in the headers ("trailers-only").
        return int(self.trailers.get("grpc-status", self.headers.get("grpc-status", "-1")))

    @property
    def status_message(self) -> str:
        return unquote(self.trailers.get("grpc-message", self.headers.get("grpc-message", "")))


def frame(message: Message) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


async def read_frames(content: aiohttp.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    while True:
        try:
            header = await content.readexactly(5)
        except asyncio.IncompleteReadError as error:
            if error.partial:
                raise
            return
        yield header[0], await content.readexactly(int.from_bytes(header[1:], "big"))


def parse_trailers(block: bytes) -> dict[str, str]:
    lines = block.decode().split("\r\n")
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


async def grpc_web_call(
    http: aiohttp.ClientSession, url: str, request: Message, response_type: type[Message], **headers: str
) -> GrpcWebReply:
    """POST one grpc-web call to `url` (base + /package.Service/Method) and read every frame."""
    loop = asyncio.get_running_loop()
    async with http.post(url, data=frame(request), headers={**GRPC_WEB_HEADERS, **headers}) as response:
        assert response.status == 200, f"HTTP {response.status}: {await response.text()}"
        reply = GrpcWebReply(headers={name.lower(): value for name, value in response.headers.items()})
        async for flags, payload in read_frames(response.content):
            if flags & TRAILER_FLAG:
                reply.trailers = parse_trailers(payload)
            else:
                reply.messages.append(response_type.FromString(payload))
                reply.arrived_at.append(loop.time())
    return reply
