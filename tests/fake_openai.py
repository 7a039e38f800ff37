"""A fake OpenAI-compatible HTTP server for tests: real HTTP, real server-sent events, scripted replies.

The real `openai` SDK talks to it like to api.openai.com (`base_url=fake.base_url`). Each request to
`/v1/chat/completions`, `/v1/embeddings`, `/v1/audio/transcriptions` or `/v1/audio/speech` takes the next
scripted FakeReply (or `default_reply` when the script is empty), so a test can say "a 429 with
Retry-After: 1, then a normal reply", "a reply that stalls after two chunks", "a tool call streamed in
fragments", and then look at what the client sent (`requests`) and when it hung up
(`RecordedRequest.disconnected_at`, noticed by the server itself).

Speech: a transcription's text is the reply's chunks joined (with stream=true, one `transcript.text.delta`
event per chunk, then `transcript.text.done` unless finish_reason is ""); the multipart form is recorded
as the body, its file as {"filename", "content_type", "data"}. Speech streams the reply's `audio` (PCM16,
or a tone as long as the input deserves when empty) in pieces of `audio_piece_bytes`; pace, stalls and
drops count those pieces as they count chat chunks.

    async with FakeOpenAI() as fake:
        fake.script(FakeReply.error(429, headers={"Retry-After": "1"}), FakeReply(chunks=["Hi", "!"]))
        client = openai.AsyncOpenAI(api_key="sk-test", base_url=fake.base_url, max_retries=0)
"""

import asyncio
import base64
import hashlib
import json
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Self

from aiohttp import web

EMBEDDING_DIMENSIONS = 8
# The fake voice: OpenAI's "pcm" rate, and how long it takes per character of input.
SPEECH_SAMPLE_RATE = 24000
SPEECH_SECONDS_PER_CHAR = 0.06


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake model makes, its arguments streamed in `fragments` pieces as OpenAI does."""

    name: str
    arguments: str = "{}"
    id: str = ""
    fragments: int = 3


@dataclass(frozen=True)
class FakeReply:
    """What the fake server answers to one request."""

    # The text, one SSE chunk per piece.
    chunks: Sequence[str] = ("Hello", " from", " the", " fake", " model.")
    tool_calls: Sequence[FakeToolCall] = ()
    # Defaults to "tool_calls" when there are tool calls, else "stop"; "" sends no finish reason at all.
    finish_reason: str | None = None
    # (prompt_tokens, completion_tokens) of the final usage chunk, sent when the client asks for usage;
    # defaults to (11, number of chunks).
    usage: tuple[int, int] | None = None
    # Seconds to wait before each chunk.
    pace: float = 0.0
    # An HTTP status other than 200 answers with an OpenAI-style error body instead of a stream.
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    error_message: str = "scripted failure"
    error_code: str | None = None
    # Close the connection abruptly after this many chunks (mid-stream failure).
    drop_after: int | None = None
    # Send nothing more after this many chunks (0: right after the headers), until the client leaves.
    stall_after: int | None = None
    # Send nothing at all, not even the status line, until the client leaves.
    stall_before_headers: bool = False
    # /v1/audio/speech: the PCM16 to stream (empty: fake_speech of the input), in pieces of this size.
    audio: bytes = b""
    audio_piece_bytes: int = 4800

    @classmethod
    def error(
        cls,
        status: int,
        message: str = "scripted failure",
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> "FakeReply":
        return cls(status=status, error_message=message, headers=headers or {}, error_code=code)


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    # time.monotonic() when it arrived, and when the server saw the client hang up before the answer
    # was complete (None: it did not).
    received_at: float
    disconnected_at: float | None = None
    completed: bool = False


class FakeOpenAI:
    def __init__(self, default_reply: FakeReply | None = None):
        self.default_reply = default_reply or FakeReply()
        self.requests: list[RecordedRequest] = []
        self._script: deque[FakeReply] = deque()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: FakeReply) -> None:
        """Queue the answers to the next requests, in order."""
        self._script.extend(replies)

    @property
    def disconnects(self) -> list[float]:
        return [request.disconnected_at for request in self.requests if request.disconnected_at is not None]

    async def wait_for_requests(self, count: int = 1, timeout: float = 2.0) -> list[RecordedRequest]:
        """The requests once `count` have arrived; TimeoutError otherwise."""
        await self._wait_until(lambda: len(self.requests) >= count, timeout)
        return self.requests

    async def wait_for_disconnects(self, count: int = 1, timeout: float = 2.0) -> list[float]:
        """The disconnect times once `count` clients have hung up mid-answer; TimeoutError otherwise."""
        await self._wait_until(lambda: len(self.disconnects) >= count, timeout)
        return self.disconnects

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(condition)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_post("/v1/audio/speech", self._speech)
        # handler_cancellation: a client hanging up cancels its handler, which is how the server notices
        # a disconnect even while it is sending nothing.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _next_reply(self) -> FakeReply:
        return self._script.popleft() if self._script else self.default_reply

    async def _record(self, request: web.Request) -> RecordedRequest:
        body = await request.json()
        recorded = RecordedRequest(request.path, dict(request.headers), body, time.monotonic())
        self.requests.append(recorded)
        await self._notify()
        return recorded

    async def _note_disconnect(self, recorded: RecordedRequest) -> None:
        recorded.disconnected_at = time.monotonic()
        await self._notify()

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        reply = self._next_reply()
        try:
            if reply.stall_before_headers:
                await asyncio.Event().wait()
            if reply.status != 200:
                return error_response(reply)
            response = await self._stream(request, recorded, reply)
        except (asyncio.CancelledError, ConnectionError):
            if not recorded.completed:
                await self._note_disconnect(recorded)
            raise
        recorded.completed = True
        return response

    async def _stream(self, request: web.Request, recorded: RecordedRequest, reply: FakeReply) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await response.prepare(request)
        model = recorded.body.get("model", "fake")
        events = [*content_events(reply), *tool_call_events(reply)]
        for sent, delta in enumerate(events):
            if sent == reply.stall_after:
                await asyncio.Event().wait()
            if sent == reply.drop_after:
                drop_connection(request, recorded)
            if reply.pace:
                await asyncio.sleep(reply.pace)
            await send(response, chunk(model, delta))
        if reply.stall_after is not None and reply.stall_after >= len(events):
            await asyncio.Event().wait()
        if reply.drop_after is not None and reply.drop_after >= len(events):
            drop_connection(request, recorded)
        if reply.finish_reason != "":
            finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
            await send(response, chunk(model, {}, finish_reason=finish))
        if (recorded.body.get("stream_options") or {}).get("include_usage"):
            prompt, completion = reply.usage or (11, len(reply.chunks))
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            await send(response, {**chunk(model, {}), "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        reply = self._next_reply()
        if reply.status != 200:
            return error_response(reply)
        inputs = recorded.body["input"]
        inputs = [inputs] if isinstance(inputs, str) else inputs
        as_base64 = recorded.body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": index, "embedding": encode(fake_embedding(text), as_base64)}
            for index, text in enumerate(inputs)
        ]
        words = sum(len(text.split()) for text in inputs)
        recorded.completed = True
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": recorded.body.get("model", "fake"),
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def _record_form(self, request: web.Request) -> RecordedRequest:
        form = await request.post()
        body: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, web.FileField):
                body[name] = {"filename": value.filename, "content_type": value.content_type, "data": value.file.read()}
            else:
                body[name] = value
        recorded = RecordedRequest(request.path, dict(request.headers), body, time.monotonic())
        self.requests.append(recorded)
        await self._notify()
        return recorded

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record_form(request)
        reply = self._next_reply()
        try:
            if reply.stall_before_headers:
                await asyncio.Event().wait()
            if reply.status != 200:
                return error_response(reply)
            if recorded.body.get("stream") == "true":
                response = await self._stream_transcript(request, recorded, reply)
            else:
                if reply.pace:
                    await asyncio.sleep(reply.pace)
                response = web.json_response({"text": "".join(reply.chunks)})
        except (asyncio.CancelledError, ConnectionError):
            if not recorded.completed:
                await self._note_disconnect(recorded)
            raise
        recorded.completed = True
        return response

    async def _stream_transcript(
        self, request: web.Request, recorded: RecordedRequest, reply: FakeReply
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **reply.headers})
        await response.prepare(request)
        for sent, piece in enumerate(reply.chunks):
            if sent == reply.stall_after:
                await asyncio.Event().wait()
            if sent == reply.drop_after:
                drop_connection(request, recorded)
            if reply.pace:
                await asyncio.sleep(reply.pace)
            await send(response, {"type": "transcript.text.delta", "delta": piece})
        if reply.stall_after is not None and reply.stall_after >= len(reply.chunks):
            await asyncio.Event().wait()
        if reply.drop_after is not None and reply.drop_after >= len(reply.chunks):
            drop_connection(request, recorded)
        if reply.finish_reason != "":
            await send(response, {"type": "transcript.text.done", "text": "".join(reply.chunks)})
        await response.write_eof()
        return response

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        reply = self._next_reply()
        try:
            if reply.stall_before_headers:
                await asyncio.Event().wait()
            if reply.status != 200:
                return error_response(reply)
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **reply.headers})
            await response.prepare(request)
            audio = reply.audio or fake_speech(recorded.body.get("input", ""))
            size = reply.audio_piece_bytes
            pieces = [audio[start : start + size] for start in range(0, len(audio), size)]
            for sent, piece in enumerate(pieces):
                if sent == reply.stall_after:
                    await asyncio.Event().wait()
                if sent == reply.drop_after:
                    drop_connection(request, recorded)
                if reply.pace:
                    await asyncio.sleep(reply.pace)
                await response.write(piece)
            if reply.stall_after is not None and reply.stall_after >= len(pieces):
                await asyncio.Event().wait()
            if reply.drop_after is not None and reply.drop_after >= len(pieces):
                drop_connection(request, recorded)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            if not recorded.completed:
                await self._note_disconnect(recorded)
            raise
        recorded.completed = True
        return response


def fake_speech(text: str, seconds_per_char: float = SPEECH_SECONDS_PER_CHAR) -> bytes:
    """A 220 Hz tone as long as the fake voice takes to say `text`, as OpenAI's "pcm" (24 kHz PCM16)."""
    samples = max(1, round(len(text) * seconds_per_char * SPEECH_SAMPLE_RATE))
    amplitude = 8000
    return struct.pack(
        f"<{samples}h",
        *(round(amplitude * math.sin(2 * math.pi * 220 * index / SPEECH_SAMPLE_RATE)) for index in range(samples)),
    )


def content_events(reply: FakeReply) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
        for index, piece in enumerate(reply.chunks)
    ]


def tool_call_events(reply: FakeReply) -> list[dict[str, Any]]:
    """Each call as OpenAI streams it: id, name and empty arguments first, then the arguments in pieces."""
    events: list[dict[str, Any]] = []
    for index, call in enumerate(reply.tool_calls):
        opening = {"index": index, "id": call.id or f"call_fake_{index}", "type": "function"}
        events.append({"tool_calls": [{**opening, "function": {"name": call.name, "arguments": ""}}]})
        for piece in split(call.arguments, call.fragments):
            events.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return events


def split(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // max(parts, 1)))
    return [text[start : start + size] for start in range(0, len(text), size)]


def chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


async def send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def drop_connection(request: web.Request, recorded: RecordedRequest) -> NoReturn:
    """Cut the connection mid-body: the client sees a broken chunked stream, as when a server dies."""
    recorded.completed = True  # the server hung up, not the client
    assert request.transport is not None
    request.transport.abort()
    raise asyncio.CancelledError


def error_response(reply: FakeReply) -> web.Response:
    error = {"message": reply.error_message, "type": "fake_error", "param": None, "code": reply.error_code}
    return web.json_response({"error": error}, status=reply.status, headers=dict(reply.headers))


def fake_embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [byte / 255 for byte in digest[:EMBEDDING_DIMENSIONS]]


def encode(vector: list[float], as_base64: bool) -> list[float] | str:
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
