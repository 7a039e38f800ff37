"""A fake OpenAI-compatible server of FIXED latency, run in its own process by `duplex bench --voice-sessions`.

It speaks the wire format the official `openai` SDK expects, so llm_service's OpenAI-compatible provider
talks to it exactly as to a real endpoint; only the latencies are made up, and they are fixed, so
whatever a voice turn takes beyond their sum is the pipeline's own:

- POST /v1/audio/transcriptions: a multipart upload (`file`, `model`, ...); answers `{"text": ...}`
  (`response_format` json / verbose_json / text, or `stream=true` server-sent events) `transcription_ms`
  after the upload was read.
- POST /v1/chat/completions: with `stream=true`, server-sent events: the role chunk at once, the first
  content chunk `chat_first_ms` after the request was read, and it ENDS A SENTENCE ("Sure. "), so speech can
  start on it; then the rest of the answer a word per chunk at `chat_tokens_per_second`, the finish chunk,
  the usage chunk (when `stream_options.include_usage`), `[DONE]`. Without `stream`, one JSON completion.
  With `chat_words` > 0 (the text benchmark) the answer is instead that many words, a word per chunk, the
  first one also `chat_first_ms` after the request was read.
- POST /v1/audio/speech: a streamed PCM16 body (24 kHz mono, as OpenAI's `response_format="pcm"`) whose first
  bytes come `speech_first_ms` after the request was read, then paced at `speech_pace` times real time.
  The audio lasts `speech_ms_per_char` per character of the input (a quiet tone).
- GET /v1/models, and GET /stats (requests served per endpoint, for the report).

    python -m duplex.bench.fake_upstream '{"transcription_ms": 150, "chat_first_ms": 200, ...}'

prints `{"port": N}` once listening, and serves until stdin closes or SIGTERM.
"""

import asyncio
import contextlib
import json
import math
import signal
import struct
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from aiohttp import web

SPEECH_SAMPLE_RATE = 24000  # OpenAI's "pcm": 24 kHz signed 16-bit little-endian mono
SPEECH_CHUNK_MS = 100
FIRST_SENTENCE = "Sure. "
REST_OF_ANSWER = ("Here is a short answer to your question, spoken while it is written. "
                  "Each sentence is spoken as soon as it is complete. That is all for now.")


@dataclass(frozen=True)
class UpstreamConfig:
    port: int = 0
    # The fixed latencies, each counted from the moment the whole request has been read.
    transcription_ms: float = 150.0
    chat_first_ms: float = 200.0
    speech_first_ms: float = 100.0
    # The rest of the answer, and the audio.
    chat_tokens_per_second: float = 50.0
    chat_words: int = 0  # > 0: a text answer of this many words (tokens) instead of the voice answer
    speech_ms_per_char: float = 60.0
    speech_pace: float = 4.0  # audio is sent this many times faster than it plays
    transcript: str = "What is the weather like today?"

    @classmethod
    def from_dict(cls, values: dict) -> "UpstreamConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @property
    def answer(self) -> str:
        return FIRST_SENTENCE + REST_OF_ANSWER

    def answer_words(self) -> list[str]:
        """The answer as streamed, a word (one token) per content chunk."""
        if self.chat_words > 0:
            vocabulary = REST_OF_ANSWER.split(" ")
            words = [vocabulary[number % len(vocabulary)] + " " for number in range(self.chat_words)]
        else:
            words = [FIRST_SENTENCE] + [word + " " for word in REST_OF_ANSWER.split(" ")]
        words[-1] = words[-1].rstrip()
        return words


@dataclass
class Stats:
    transcriptions: int = 0
    chats: int = 0
    speeches: int = 0
    speech_characters: int = 0
    speech_bytes: int = 0
    disconnects: int = 0
    # How late each fixed delay actually ended (the fake's own event-loop lag), worst seen, in ms.
    worst_lateness_ms: float = 0.0
    lateness_ms: list[float] = field(default_factory=list)
    # The newest requests: [endpoint, arrived, read, first byte sent, done], on the machine's monotonic clock
    # (time.monotonic() is CLOCK_MONOTONIC, the same in every process), so a run of one session can be
    # laid against the client's own timings.
    timeline: list[list] = field(default_factory=list)


class FakeUpstream:
    def __init__(self, config: UpstreamConfig):
        self.config = config
        self.stats = Stats()
        self._tone = _tone(SPEECH_SAMPLE_RATE)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        # handler_cancellation: a client hanging up (a cancelled turn) stops its handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.config.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _wait_until(self, due: float) -> None:
        """Sleep until `due` (loop time); note how late the loop woke."""
        loop = asyncio.get_running_loop()
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late = (loop.time() - due) * 1000
        self.stats.lateness_ms.append(late)
        if len(self.stats.lateness_ms) > 10000:
            del self.stats.lateness_ms[:5000]
        self.stats.worst_lateness_ms = max(self.stats.worst_lateness_ms, late)

    def _mark(self, endpoint: str) -> list:
        mark = [endpoint, time.monotonic(), None, None, None]
        self.stats.timeline.append(mark)
        if len(self.stats.timeline) > 4000:
            del self.stats.timeline[:2000]
        return mark

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        mark = self._mark("transcription")
        form = await request.post()  # the whole multipart upload
        mark[2] = time.monotonic()
        due = asyncio.get_running_loop().time() + self.config.transcription_ms / 1000
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return _error(400, "file is required")
        upload.file.read()
        self.stats.transcriptions += 1
        text = self.config.transcript
        await self._wait_until(due)
        mark[3] = mark[4] = time.monotonic()
        if str(form.get("stream", "")).lower() == "true":
            response = _sse_response()
            await response.prepare(request)
            await _send(response, {"type": "transcript.text.delta", "delta": text})
            await _send(response, {"type": "transcript.text.done", "text": text})
            return response
        response_format = str(form.get("response_format", "json"))
        if response_format in ("text", "srt", "vtt"):
            return web.Response(text=text + "\n", content_type="text/plain")
        body: dict = {"text": text}
        if response_format == "verbose_json":
            body |= {"task": "transcribe", "language": "english", "duration": 2.0, "segments": []}
        return web.json_response(body)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        mark = self._mark("chat")
        body = await request.json()
        mark[2] = time.monotonic()
        loop = asyncio.get_running_loop()
        due = loop.time() + self.config.chat_first_ms / 1000
        self.stats.chats += 1
        model = body.get("model", "fake")
        words = self.config.answer_words()
        usage = {"prompt_tokens": 12 * len(body.get("messages", [])), "completion_tokens": len(words),
                 "total_tokens": 12 * len(body.get("messages", [])) + len(words)}
        if not body.get("stream"):
            await self._wait_until(due)
            return web.json_response({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(words)}}],
            })
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        response = _sse_response()
        await response.prepare(request)
        await _send(response, chunk({"role": "assistant", "content": ""}))
        interval = 1 / self.config.chat_tokens_per_second if self.config.chat_tokens_per_second > 0 else 0
        for number, word in enumerate(words):
            await self._wait_until(due + number * interval)
            await _send(response, chunk({"content": word}))
            if number == 0:
                mark[3] = time.monotonic()
        await _send(response, chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await _send(response, {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        mark[4] = time.monotonic()
        return response

    async def speech(self, request: web.Request) -> web.StreamResponse:
        mark = self._mark("speech")
        body = await request.json()
        mark[2] = time.monotonic()
        loop = asyncio.get_running_loop()
        due = loop.time() + self.config.speech_first_ms / 1000
        text = str(body.get("input", ""))
        if not text.strip():
            return _error(400, "input is required")
        if body.get("response_format", "mp3") != "pcm":
            return _error(400, "this fake speaks response_format=pcm only")
        self.stats.speeches += 1
        self.stats.speech_characters += len(text)
        total_ms = max(SPEECH_CHUNK_MS, len(text) * self.config.speech_ms_per_char)
        chunk_bytes = SPEECH_SAMPLE_RATE * 2 * SPEECH_CHUNK_MS // 1000
        total_bytes = int(total_ms * SPEECH_SAMPLE_RATE / 1000) * 2
        interval = SPEECH_CHUNK_MS / 1000 / self.config.speech_pace if self.config.speech_pace > 0 else 0
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await self._wait_until(due)
        await response.prepare(request)
        sent = 0
        try:
            while sent < total_bytes:
                size = min(chunk_bytes, total_bytes - sent)
                await response.write(self._tone[:size])
                mark[3] = mark[3] or time.monotonic()
                sent += size
                self.stats.speech_bytes += size
                if sent < total_bytes:
                    await self._wait_until(due + (sent // chunk_bytes) * interval)
            await response.write_eof()
            mark[4] = time.monotonic()
        except (asyncio.CancelledError, ConnectionError):
            self.stats.disconnects += 1
            raise
        return response

    async def models(self, request: web.Request) -> web.Response:
        names = ("fake-chat", "fake-transcribe", "fake-speech")
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "duplex-bench"} for name in names]})

    async def get_stats(self, request: web.Request) -> web.Response:
        stats = asdict(self.stats)
        if request.query.get("timeline") != "1":
            stats.pop("timeline")
        lateness = sorted(stats.pop("lateness_ms"))
        stats["lateness_p50_ms"] = lateness[len(lateness) // 2] if lateness else 0.0
        stats["lateness_p99_ms"] = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))] if lateness else 0.0
        return web.json_response(stats)


def _tone(rate: int) -> bytes:
    """One chunk-plus of a quiet 220 Hz tone, PCM16."""
    samples = rate * SPEECH_CHUNK_MS // 1000
    return b"".join(struct.pack("<h", int(2000 * math.sin(2 * math.pi * 220 * n / rate))) for n in range(samples))


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                             status=status)


async def serve(config: UpstreamConfig) -> None:
    upstream = FakeUpstream(config)
    port = await upstream.start()
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The parent holds our stdin: when it goes away (even killed), so do we. A daemon thread, so a
    # SIGTERM'd exit never waits for it.
    threading.Thread(target=_wait_for_eof, args=(loop, stop), daemon=True).start()
    await stop.wait()
    with contextlib.suppress(Exception):
        await upstream.close()


def _wait_for_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    sys.stdin.read()
    with contextlib.suppress(RuntimeError):  # the loop may be closed already
        loop.call_soon_threadsafe(stop.set)


def main() -> None:
    config = UpstreamConfig.from_dict(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
