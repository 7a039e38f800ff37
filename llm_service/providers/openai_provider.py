"""`openai`: models behind any OpenAI-compatible HTTP API, through the official `openai` SDK.

OpenAI itself, vLLM, Ollama, llama.cpp, LiteLLM, Gemini's OpenAI endpoint... anything that speaks
`/chat/completions` with server-sent events; speech models use `/audio/transcriptions` (the utterance
as a WAV file; its text streamed as `transcript.text.delta` events where the model can) and
`/audio/speech` (raw "pcm" audio, read as it streams). One AsyncOpenAI client per (base URL, key), shared
by the models that use them and closed with the provider.

Each call is exactly one upstream attempt (the SDK's own retries are off): retries, fallbacks and the
deadline belong to llm_service.resilience. Failures become duplex errors whose messages never hold the
API key, the base URL or the upstream's raw answer to a rejected key.
"""

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import anyio
import httpx2
import openai
import orjson
from pydantic import SecretStr

from duplex.common.errors import DuplexError, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from llm_service.audio import wav_file
from llm_service.providers.base import (
    PCM_SAMPLE_BYTES,
    ChatMessage,
    Chunk,
    EmbeddingRequest,
    Embeddings,
    Finished,
    FinishReason,
    GenerationRequest,
    InterimTranscripts,
    ModelDescription,
    Role,
    SpeechAudio,
    SpeechRequest,
    Started,
    StreamItem,
    ToolCall,
    ToolCallItem,
    ToolDefinition,
    TranscriptDelta,
    TranscriptDone,
    TranscriptionRequest,
    TranscriptItem,
)

log = logging.getLogger(__name__)

PROVIDER_NAME = "openai"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# OpenAI's "pcm" speech: 24 kHz, signed 16-bit little-endian, mono, no header.
OPENAI_PCM_SAMPLE_RATE = 24000
# Errors of the HTTP client while a streamed body (chat or speech) is read, which the SDK does not map.
READ_ERRORS = (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)
# Upstream error texts quoted in our messages are cut to this length.
UPSTREAM_MESSAGE_MAX_CHARS = 200
# Connecting should never take long; waiting for tokens may.
CONNECT_TIMEOUT_SECONDS = 10.0
STREAM_ARGUMENTS = {"stream": True, "stream_options": {"include_usage": True}}
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
}


@dataclass(frozen=True, slots=True)
class OpenAIModel:
    """One public model served through an OpenAI-compatible endpoint."""

    name: str
    upstream_model: str
    api_key: SecretStr = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    description: str = ""
    supports_tools: bool = True
    supports_embeddings: bool = False
    fallbacks: tuple[str, ...] = ()
    # OpenAI's reasoning models only accept max_completion_tokens; many compatible servers only max_tokens.
    max_tokens_parameter: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    supports_generation: bool = True
    supports_transcription: bool = False
    # Its transcriptions can stream (stream=true), which gives interim results.
    transcription_stream: bool = False
    supports_speech: bool = False
    voices: tuple[str, ...] = ()
    # The rate of its "pcm" speech.
    speech_sample_rate: int = OPENAI_PCM_SAMPLE_RATE

    @property
    def client_key(self) -> tuple[str, str]:
        return (self.base_url, self.api_key.get_secret_value())


class OpenAIProvider:
    """Serves the configured OpenAI-compatible models."""

    name = PROVIDER_NAME

    def __init__(self, models: Sequence[OpenAIModel], *, timeout_seconds: float = 60.0):
        self._models = {model.name: model for model in models}
        self._timeout_seconds = timeout_seconds
        self._clients: dict[tuple[str, str], openai.AsyncOpenAI] = {}
        for model in models:
            if model.client_key not in self._clients:
                self._clients[model.client_key] = openai.AsyncOpenAI(
                    api_key=model.api_key.get_secret_value(),
                    base_url=model.base_url,
                    # The only retries are llm_service.resilience's, which know the call's deadline.
                    max_retries=0,
                    timeout=self._timeout(None),
                    # The SDK's aiohttp transport: half the CPU per streamed chunk of its default httpx one.
                    http_client=openai.DefaultAioHttpClient(),
                )
        # Scrubbed from every upstream text we quote, in case an upstream echoes a key back.
        self._secrets = tuple({model.api_key.get_secret_value() for model in models} - {""})

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def models(self) -> list[ModelDescription]:
        return [
            ModelDescription(
                name=model.name,
                provider=PROVIDER_NAME,
                description=model.description or f"{model.upstream_model} via {public_host(model.base_url)}",
                supports_tools=model.supports_tools,
                supports_embeddings=model.supports_embeddings,
                fallbacks=model.fallbacks,
                supports_generation=model.supports_generation,
                supports_transcription=model.supports_transcription,
                interim_transcripts=(
                    InterimTranscripts.STREAMED if model.transcription_stream else InterimTranscripts.NONE
                ),
                supports_speech=model.supports_speech,
                voices=model.voices,
                speech_sample_rate=model.speech_sample_rate if model.supports_speech else 0,
            )
            for model in self._models.values()
        ]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        model = self._models[request.model]
        # The SDK sends the request (auth, base URL, headers, timeouts, status errors) as its documented
        # `post` for any endpoint does: without its per-request transform of the arguments and its
        # per-chunk objects, which cost more than everything else here. The body's server-sent events are
        # parsed into just the fields used.
        try:
            body = await self._client(model).post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=chat_completion_arguments(model, request) | STREAM_ARGUMENTS,
                options={"timeout": self._timeout(request.timeout)},
                stream=True,
            )
        except openai.OpenAIError as error:
            raise self._domain_error(error, model.name) from None
        # Closed however the reply ends (finished, failed, cancelled, closed by the caller), so the
        # upstream HTTP stream never outlives the call: the upstream sees the disconnect and stops.
        try:
            async with aclosing(read_reply(request, body)) as items:
                async for item in items:
                    yield item
        except READ_ERRORS as error:
            raise self._logged(read_error(error, model.name)) from None
        finally:
            await body.aclose()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        model = self._models[request.model]
        try:
            response = await self._client(model).embeddings.create(
                model=model.upstream_model,
                input=list(request.inputs),
                encoding_format="float",
                timeout=self._timeout(request.timeout),
            )
        except openai.OpenAIError as error:
            raise self._domain_error(error, model.name) from None
        ordered = sorted(response.data, key=lambda item: item.index)
        return Embeddings(
            vectors=tuple(tuple(item.embedding) for item in ordered),
            prompt_tokens=response.usage.prompt_tokens if response.usage else 0,
        )

    async def transcribe(self, request: TranscriptionRequest) -> AsyncGenerator[TranscriptItem, None]:
        model = self._models[request.model]
        stream = request.stream and model.transcription_stream
        arguments: dict[str, Any] = {
            "model": model.upstream_model,
            "file": ("utterance.wav", wav_file(request.pcm16, request.sample_rate), "audio/wav"),
            "response_format": "json",
            "timeout": self._timeout(request.timeout),
        }
        if request.language:
            arguments["language"] = request.language
        try:
            if not stream:
                transcription = await self._client(model).audio.transcriptions.create(**arguments)
                yield TranscriptDone(transcription.text)
                return
            events = await self._client(model).audio.transcriptions.create(**arguments, stream=True)
        except openai.OpenAIError as error:
            raise self._domain_error(error, model.name) from None
        # Closed however the transcription ends, as the chat stream is.
        try:
            async with aclosing(self._read_transcript(model, events)) as items:
                async for item in items:
                    yield item
        except openai.OpenAIError as error:
            raise self._domain_error(error, model.name) from None
        finally:
            await events.close()

    @staticmethod
    async def _read_transcript(model: OpenAIModel, events: openai.AsyncStream) -> AsyncGenerator[TranscriptItem, None]:
        async for event in events:
            kind = getattr(event, "type", "")
            if kind == "transcript.text.delta" and event.delta:
                yield TranscriptDelta(event.delta)
            elif kind == "transcript.text.done":
                yield TranscriptDone(event.text)
                return
        raise Unavailable(f"model '{model.name}' stopped before finishing its transcript")

    async def synthesize(self, request: SpeechRequest) -> AsyncGenerator[SpeechAudio, None]:
        model = self._models[request.model]
        speech = self._client(model).audio.speech.with_streaming_response.create(
            model=model.upstream_model,
            voice=request.voice,
            input=request.text,
            response_format="pcm",
            timeout=self._timeout(request.timeout),
        )
        # The response is closed when the block is left, however that happens (finished, failed, the
        # caller closing this generator because the client went away): the upstream sees it at once.
        try:
            async with speech as response:
                odd = b""
                async for data in response.iter_bytes():
                    data = odd + data
                    whole = len(data) - len(data) % PCM_SAMPLE_BYTES
                    odd = data[whole:]
                    if whole:
                        yield SpeechAudio(pcm16=data[:whole], sample_rate=model.speech_sample_rate)
        except openai.OpenAIError as error:
            raise self._domain_error(error, model.name) from None
        except READ_ERRORS as error:
            raise self._logged(read_error(error, model.name)) from None

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def _client(self, model: OpenAIModel) -> openai.AsyncOpenAI:
        client = self._clients.get(model.client_key)
        if client is None:
            raise Unavailable(f"model '{model.name}' is unavailable: the service is stopping")
        return client

    def _timeout(self, remaining: float | None) -> openai.Timeout:
        """Per request: the configured wait for the upstream's next bytes, never beyond the deadline."""
        seconds = self._timeout_seconds if remaining is None else max(min(self._timeout_seconds, remaining), 0.001)
        return openai.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT_SECONDS))

    def _domain_error(self, error: openai.OpenAIError, model: str) -> DuplexError:
        return self._logged(to_domain_error(error, model, self._secrets))

    @staticmethod
    def _logged(error: DuplexError) -> DuplexError:
        log.info("%s", error.message)
        return error


async def read_reply(request: GenerationRequest, body: httpx2.Response) -> AsyncGenerator[StreamItem, None]:
    """A streamed chat completion's items, from its server-sent events."""
    estimated_prompt_tokens = estimate_prompt_tokens(request.messages)
    yield Started(model=request.model, prompt_tokens=estimated_prompt_tokens)
    calls = ToolCallAssembler()
    finish_reason: str | None = None
    usage: Mapping[str, Any] = {}
    chunks = 0
    async for completion_chunk in completion_chunks(request.model, body):
        usage = completion_chunk.get("usage") or usage
        # Lenient about what compatible servers leave out (choices in the usage chunk, empty deltas).
        for choice in (completion_chunk.get("choices") or [])[:1]:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                chunks += 1
                # Upstreams send about a token per chunk; the final usage has the exact count.
                yield Chunk(text=content, token_count=1)
            if delta.get("tool_calls"):
                calls.add(delta["tool_calls"])
            finish_reason = choice.get("finish_reason") or finish_reason
    if finish_reason is None:
        # The upstream closed the stream without finishing its reply.
        raise Unavailable(f"model '{request.model}' stopped before finishing its reply")
    tool_calls = calls.complete()
    for call in tool_calls:
        yield ToolCallItem(call)
    # Some servers finish a tool-calling reply with "stop"; the calls are what matters.
    reason = FinishReason.TOOL_CALLS if tool_calls else FINISH_REASONS.get(finish_reason, FinishReason.STOP)
    yield Finished(
        finish_reason=reason,
        prompt_tokens=usage.get("prompt_tokens") or 0 if usage else estimated_prompt_tokens,
        completion_tokens=usage.get("completion_tokens") or 0 if usage else chunks + calls.estimated_tokens(),
    )


async def completion_chunks(model: str, body: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
    """Each chunk of a streamed chat completion as a dict, up to `data: [DONE]`. An error event (as the SDK
    reads them: an object with an `error`) or data that is not a JSON object fails the reply."""
    events = ServerSentEvents()
    received = body.aiter_bytes()
    async for data in received:
        for payload in events.feed(data):
            if payload.startswith(b"[DONE]"):
                # Read to the end (nothing more comes) so the connection goes back to the pool.
                async for _ in received:
                    pass
                return
            try:
                completion_chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                completion_chunk = None
            if not isinstance(completion_chunk, dict):
                raise Unavailable(f"model '{model}' failed: its provider sent a reply that could not be read")
            if completion_chunk.get("error"):
                raise Unavailable(f"model '{model}' failed: its provider reported an error")
            yield completion_chunk


class ServerSentEvents:
    """The `data` of each server-sent event in a byte stream fed in pieces as they arrive (the WHATWG
    rules for what chat completions use: `data` lines joined by newlines, comments and other fields ignored)."""

    def __init__(self) -> None:
        self._partial = b""  # the start of a line whose end has not arrived
        self._data: list[bytes] = []

    def feed(self, received: bytes) -> list[bytes]:
        lines = (self._partial + received).splitlines(keepends=True)
        # An unfinished line waits for the rest; so does a line ending in CR, whose LF may come next.
        self._partial = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        events = []
        for line in lines:
            line = line.rstrip(b"\r\n")
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


def chat_completion_arguments(model: OpenAIModel, request: GenerationRequest) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "model": model.upstream_model,
        "messages": [chat_message(message) for message in request.messages],
    }
    if request.tools:
        arguments["tools"] = [tool_spec(tool) for tool in request.tools]
    if request.max_tokens:
        arguments[model.max_tokens_parameter] = request.max_tokens
    return arguments


def chat_message(message: ChatMessage) -> dict[str, Any]:
    if message.role == Role.TOOL:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == Role.ASSISTANT and message.tool_calls:
        return {
            "role": "assistant",
            # OpenAI wants null, not "", for an assistant message that only calls tools.
            "content": message.content or None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
                for call in message.tool_calls
            ],
        }
    return {"role": message.role.value, "content": message.content}


def tool_spec(tool: ToolDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": dict(tool.parameters)}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


class ToolCallAssembler:
    """Joins the fragments of streamed tool calls, as OpenAI sends them, into complete calls.

    The first fragment of a call carries its index, id and name; the later ones carry the same index and
    the next piece of the arguments' JSON.
    """

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, fragments: Iterable[Mapping[str, Any]]) -> None:
        for fragment in fragments:
            call = self._calls.setdefault(fragment.get("index") or 0, {"id": "", "name": "", "arguments": ""})
            call["id"] = fragment.get("id") or call["id"]
            function = fragment.get("function")
            if function:
                # Some servers repeat the name in every fragment, some split it: never double it.
                name = function.get("name") or ""
                call["name"] = name if name.startswith(call["name"]) else call["name"] + name
                call["arguments"] += function.get("arguments") or ""

    def complete(self) -> list[ToolCall]:
        return [
            ToolCall(id=call["id"] or f"call_{index}", name=call["name"], arguments_json=call["arguments"] or "{}")
            for index, call in sorted(self._calls.items())
        ]

    def estimated_tokens(self) -> int:
        return sum(estimate_tokens(call["name"] + call["arguments"]) for call in self._calls.values())


def to_domain_error(error: openai.OpenAIError, model: str, secrets: Sequence[str] = ()) -> DuplexError:
    """The duplex error for a failed upstream call; its message is safe to show anyone."""
    if isinstance(error, openai.APIStatusError):
        return status_error(error, model, secrets)
    if isinstance(error, openai.APIConnectionError):  # APITimeoutError included
        return read_error(error, model)
    # e.g. an error event in the middle of the stream, or an answer the SDK could not read.
    return Unavailable(f"model '{model}' failed: its provider reported an error")


def read_error(error: Exception, model: str) -> DuplexError:
    """A request or reply that failed on the way: it timed out, or the connection failed."""
    if timed_out(error):
        return Unavailable(f"model '{model}' timed out: its provider did not answer in time")
    return Unavailable(f"model '{model}' is unavailable: the connection to its provider failed")


def timed_out(error: BaseException) -> bool:
    """Whether a failed request timed out. The SDK's aiohttp transport reports a refused or dropped
    connection as a connect timeout too (it maps aiohttp's ClientConnectionError before its subclasses), so
    aiohttp's own error, where there is one, decides."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError):
            return isinstance(cause, asyncio.TimeoutError)
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, openai.APITimeoutError | httpx2.TimeoutException)


def status_error(error: openai.APIStatusError, model: str, secrets: Sequence[str]) -> DuplexError:
    status = error.status_code
    retry_after = retry_after_seconds(error.response.headers)
    if status in (401, 403):
        # Never the upstream's text: OpenAI's answer to a wrong key quotes part of the key.
        return FailedPrecondition(f"the provider of model '{model}' rejected the configured credentials ({status})")
    if status == 429 and error.code == "insufficient_quota":
        return FailedPrecondition(f"the provider account of model '{model}' has no quota left (429)")
    if status == 429:
        return ResourceExhausted(f"model '{model}' is rate limited by its provider (429)", retry_after=retry_after)
    if status in (408, 409) or status >= 500:
        return Unavailable(f"model '{model}' is unavailable: its provider answered {status}", retry_after=retry_after)
    detail = upstream_message(error.body, secrets)
    return InvalidArgument(f"model '{model}' rejected the request ({status}){': ' + detail if detail else ''}")


def upstream_message(body: object, secrets: Sequence[str]) -> str:
    """The upstream's own error text (e.g. "The model `x` does not exist"), one line, short, scrubbed."""
    message = body.get("message") if isinstance(body, Mapping) else None
    if not isinstance(message, str):
        return ""
    for secret in secrets:
        message = message.replace(secret, "[redacted]")
    message = " ".join(message.split())
    if len(message) > UPSTREAM_MESSAGE_MAX_CHARS:
        message = message[:UPSTREAM_MESSAGE_MAX_CHARS] + "..."
    return message


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """When the upstream asked to be called again: `retry-after-ms`, or `Retry-After` in seconds or as an
    HTTP date; None when absent or unreadable."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        seconds = parse_float(milliseconds)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_float(value)
    if seconds is not None:
        return seconds
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - (now or datetime.now(UTC))).total_seconds(), 0.0)


def parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 and value != float("inf") else None


def public_host(base_url: str) -> str:
    """The host of a base URL without any credentials in it, for descriptions."""
    host = base_url.split("://", 1)[-1].split("/", 1)[0]
    return host.rsplit("@", 1)[-1]


def estimate_tokens(text: str) -> int:
    """About four characters per token: no offline tokenizer exists here (tiktoken needs the network)."""
    return (len(text) + 3) // 4


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    return sum(
        estimate_tokens(message.content) + sum(estimate_tokens(call.arguments_json) for call in message.tool_calls)
        for message in messages
    )
