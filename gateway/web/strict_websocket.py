"""aiohttp's WebSocket server, made to refuse unmasked client frames as RFC 6455 section 5.1 requires
("The server MUST close the connection upon receiving a frame that is not masked", with 1002).

aiohttp's frame parser unmasks a masked frame and accepts an unmasked one alike, and offers no hook, so
`MaskedFramesOnly` sits in front of it: it follows frame boundaries (headers byte by byte, payloads
skipped whole), passes the bytes on untouched, and on the first unmasked frame ends the socket's message
queue with a protocol error, which aiohttp answers by closing with 1002. Pinned to aiohttp 3.14: it
reaches the handler protocol's parser and the response's message queue, which aiohttp keeps private.
"""

from aiohttp import WSCloseCode, web
from aiohttp.http_websocket import WebSocketError

MASK_BIT = 0x80
LENGTH_MASK = 0x7F
EXTENDED_LENGTH_BYTES = {126: 2, 127: 8}
MASK_KEY_BYTES = 4


class MaskedFramesOnly:
    """Feeds aiohttp's frame parser, refusing the stream at the first frame without a mask."""

    def __init__(self, parser, refuse):
        self._parser = parser
        self._refuse = refuse  # called once with the WebSocketError that ends the socket
        self._header = bytearray()  # the header of the frame being read, until it is whole
        self._payload_left = 0
        self._refused = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._refused:
            return True, b""
        if not self._all_masked(data):
            self._refused = True
            self._refuse(WebSocketError(WSCloseCode.PROTOCOL_ERROR, "client frames must be masked"))
            return True, b""
        return self._parser.feed_data(data)

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def _all_masked(self, data: bytes) -> bool:
        position, size = 0, len(data)
        while position < size:
            if self._payload_left:
                step = min(self._payload_left, size - position)
                self._payload_left -= step
                position += step
                continue
            self._header.append(data[position])
            position += 1
            if len(self._header) < 2:
                continue
            if not self._header[1] & MASK_BIT:
                return False
            length_code = self._header[1] & LENGTH_MASK
            extended = EXTENDED_LENGTH_BYTES.get(length_code, 0)
            if len(self._header) < 2 + extended + MASK_KEY_BYTES:
                continue
            self._payload_left = int.from_bytes(self._header[2 : 2 + extended]) if extended else length_code
            self._header.clear()
        return True


class StrictWebSocketResponse(web.WebSocketResponse):
    """A WebSocketResponse that closes with 1002 on an unmasked client frame."""

    def _post_start(self, request, protocol, writer) -> None:
        # Bytes that came with the upgrade request are held back, so that they too pass the check.
        tail, request.protocol._message_tail = request.protocol._message_tail, b""
        super()._post_start(request, protocol, writer)
        guard = MaskedFramesOnly(request.protocol._payload_parser, self._reader.set_exception)
        request.protocol._payload_parser = guard
        if tail:
            guard.feed_data(tail)
