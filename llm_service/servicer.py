"""`duplex.llm.v1.LlmService`: validates requests, routes them to a provider, streams its reply back.

The only place that knows both the protos and the provider dataclasses (and the speech sessions' own).
Errors are raised as duplex.common.errors exceptions; the server's ErrorInterceptor turns them into
statuses.
"""

import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc

from duplex.common.errors import Internal, InvalidArgument
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.audio import OPUS_SAMPLE_RATES, AudioEncoding, check_sample_rate
from llm_service.coalescing import coalesce_chunks
from llm_service.providers.base import (
    TRANSCRIPTION_SAMPLE_RATE,
    Capability,
    ChatMessage,
    Chunk,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelDescription,
    Role,
    Started,
    StreamItem,
    ToolCall,
    ToolCallItem,
    ToolDefinition,
)
from llm_service.resilience import Deadline, ModelRouter
from llm_service.synthesis import (
    AudioChunkEvent,
    SynthesisFinishedEvent,
    SynthesisSession,
    SynthesisSetup,
    SynthesisStartedEvent,
    SynthesizeEvent,
)
from llm_service.transcription import (
    AudioInput,
    CommitInput,
    SpeechLimits,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    TranscribeEvent,
    TranscribeInput,
    TranscriptionSession,
    TranscriptionSetup,
)
from llm_service.vad import VadPool

log = logging.getLogger(__name__)

# Bounds the work one request can cause; far beyond any context window a provider accepts.
MAX_PROMPT_CHARS = 1_000_000
# OpenAI's limits, which every provider can live with.
MAX_EMBED_INPUTS = 2048
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LANGUAGE = re.compile(r"[a-z]{2,3}")

ROLES = {
    llm_pb2.ROLE_SYSTEM: Role.SYSTEM,
    llm_pb2.ROLE_USER: Role.USER,
    llm_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    llm_pb2.ROLE_TOOL: Role.TOOL,
}
ENCODINGS = {
    llm_pb2.AUDIO_ENCODING_UNSPECIFIED: AudioEncoding.PCM16,
    llm_pb2.AUDIO_ENCODING_PCM16: AudioEncoding.PCM16,
    llm_pb2.AUDIO_ENCODING_WAV: AudioEncoding.WAV,
    llm_pb2.AUDIO_ENCODING_WEBM_OPUS: AudioEncoding.WEBM_OPUS,
    llm_pb2.AUDIO_ENCODING_OGG_OPUS: AudioEncoding.OGG_OPUS,
}
PROTO_ENCODINGS = {
    AudioEncoding.PCM16: llm_pb2.AUDIO_ENCODING_PCM16,
    AudioEncoding.WAV: llm_pb2.AUDIO_ENCODING_WAV,
    AudioEncoding.WEBM_OPUS: llm_pb2.AUDIO_ENCODING_WEBM_OPUS,
    AudioEncoding.OGG_OPUS: llm_pb2.AUDIO_ENCODING_OGG_OPUS,
}
SPEECH_OUTPUT_ENCODINGS = (AudioEncoding.PCM16, AudioEncoding.WAV, AudioEncoding.OGG_OPUS)
FINISH_REASONS = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: llm_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.TOOL_CALLS: llm_pb2.FINISH_REASON_TOOL_CALLS,
}


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(
        self,
        router: ModelRouter,
        coalesce_window_seconds: float = 0.0,
        speech_limits: SpeechLimits | None = None,
        vad_pool: VadPool | None = None,
    ):
        self._router = router
        self._coalesce_window_seconds = coalesce_window_seconds
        self._speech_limits = speech_limits or SpeechLimits()
        self._vad_pool = vad_pool or VadPool()

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        messages = to_chat_messages(request.messages)
        tools = to_tool_definitions(request.tools)
        model = self._router.resolve(request.model)
        generation = GenerationRequest(model=model.name, messages=messages, max_tokens=request.max_tokens, tools=tools)
        deadline = Deadline(context.time_remaining())
        order = StreamOrder(model.name)
        stream = coalesce_chunks(self._router.generate(generation, deadline), self._coalesce_window_seconds)
        # aclosing: however the call ends (finished, failed, cancelled by the client, deadline), the
        # provider's stream is closed right then, so its upstream request does not outlive the call.
        async with aclosing(stream) as items:
            async for item in items:
                order.check(item)
                yield to_response(item)
        order.check_complete()
        log.debug("generated with %s: %s", order.started, order.finished)

    async def ListModels(
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.ListModelsResponse:
        models = [to_model_info(model) for model in self._router.models()]
        return llm_pb2.ListModelsResponse(
            models=models,
            default_model=self._router.default_model,
            default_transcription_model=self._router.default_transcription_model,
            default_speech_model=self._router.default_speech_model,
        )

    async def Transcribe(
        self, request_iterator: AsyncIterator[llm_pb2.TranscribeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.TranscribeResponse]:
        requests = aiter(request_iterator)
        first = await first_request(requests, "TranscribeRequest")
        setup = self._transcription_setup(first.config)
        yield llm_pb2.TranscribeResponse(started=llm_pb2.TranscribeStarted(model=setup.model.name))
        session = TranscriptionSession(
            self._router, setup, self._speech_limits, self._vad_pool, Deadline(context.time_remaining())
        )
        # aclosing: however the call ends, the session's workers and the provider's upstream stop then.
        async with aclosing(session.run(transcribe_inputs(requests, self._speech_limits))) as events:
            async for event in events:
                yield to_transcribe_response(event)

    async def Synthesize(
        self, request_iterator: AsyncIterator[llm_pb2.SynthesizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.SynthesizeResponse]:
        requests = aiter(request_iterator)
        first = await first_request(requests, "SynthesizeRequest")
        setup = self._synthesis_setup(first.config)
        session = SynthesisSession(self._router, setup, Deadline(context.time_remaining()))
        async with aclosing(session.run(synthesize_texts(requests))) as events:
            async for event in events:
                yield to_synthesize_response(event)

    def _transcription_setup(self, config: llm_pb2.TranscribeConfig) -> TranscriptionSetup:
        model = self._router.resolve(config.model, Capability.TRANSCRIPTION)
        encoding = to_encoding(config.format.encoding, "format.encoding")
        sample_rate = config.format.sample_rate_hz or TRANSCRIPTION_SAMPLE_RATE
        check_sample_rate(sample_rate, "format.sample_rate_hz")
        language = config.language.strip().lower()
        if language and not LANGUAGE.fullmatch(language):
            raise InvalidArgument(f"language {config.language!r} is not an ISO 639-1 code such as 'en'")
        if language and model.languages and language not in model.languages:
            raise InvalidArgument(f"model '{model.name}' transcribes {', '.join(model.languages)} only")
        if config.turn_detection not in TURN_DETECTIONS:
            raise InvalidArgument(f"turn_detection {config.turn_detection} is not a known TurnDetection")
        server_vad = config.turn_detection == llm_pb2.TURN_DETECTION_SERVER_VAD
        if server_vad and encoding != AudioEncoding.PCM16:
            raise InvalidArgument("server VAD needs PCM16 audio; send PCM16, or commit each utterance yourself")
        return TranscriptionSetup(
            model=model,
            encoding=encoding,
            sample_rate=sample_rate,
            language=language,
            server_vad=server_vad,
            interim=config.interim_results,
        )

    def _synthesis_setup(self, config: llm_pb2.SynthesizeConfig) -> SynthesisSetup:
        model = self._router.resolve(config.model, Capability.SPEECH)
        voice = config.voice or (model.voices[0] if model.voices else "")
        if not voice:
            raise InvalidArgument(f"model '{model.name}' lists no voices: name one in voice")
        if model.voices and voice not in model.voices:
            raise InvalidArgument(f"model '{model.name}' has no voice '{voice}'; it has {', '.join(model.voices)}")
        encoding = to_encoding(config.format.encoding, "format.encoding")
        if encoding not in SPEECH_OUTPUT_ENCODINGS:
            raise InvalidArgument("Synthesize speaks PCM16, WAV or Ogg Opus, not WebM Opus")
        sample_rate = config.format.sample_rate_hz
        if sample_rate:
            check_sample_rate(sample_rate, "format.sample_rate_hz")
            if encoding == AudioEncoding.OGG_OPUS and sample_rate not in OPUS_SAMPLE_RATES:
                rates = ", ".join(str(rate) for rate in OPUS_SAMPLE_RATES)
                raise InvalidArgument(f"Ogg Opus takes a sample rate of {rates} Hz, not {sample_rate}")
        return SynthesisSetup(model=model, voice=voice, encoding=encoding, sample_rate=sample_rate)

    async def Embed(self, request: llm_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> llm_pb2.EmbedResponse:
        inputs = check_embed_inputs(request.inputs)
        model, embeddings = await self._router.embed(request.model, inputs, Deadline(context.time_remaining()))
        if len(embeddings.vectors) != len(inputs):
            log.error("model %s returned %d vectors for %d inputs", model, len(embeddings.vectors), len(inputs))
            raise Internal(f"model '{model}' failed")
        return llm_pb2.EmbedResponse(
            embeddings=[llm_pb2.Embedding(values=vector) for vector in embeddings.vectors],
            model=model,
            prompt_tokens=embeddings.prompt_tokens,
        )


class StreamOrder:
    """Checks that a provider keeps the stream contract: one Started, Chunks, ToolCallItems, one Finished.

    A provider that breaks it is a bug; the client gets INTERNAL rather than a stream it cannot trust.
    """

    def __init__(self, model: str):
        self._model = model
        self.started: Started | None = None
        self.finished: Finished | None = None

    def check(self, item: StreamItem) -> None:
        if self.finished is not None:
            self._broken(f"{type(item).__name__} after Finished")
        if isinstance(item, Started):
            if self.started is not None:
                self._broken("a second Started")
            self.started = item
        elif self.started is None:
            self._broken(f"{type(item).__name__} before Started")
        elif isinstance(item, Finished):
            self.finished = item
        elif not isinstance(item, Chunk | ToolCallItem):
            self._broken(f"an unknown item {item!r}")

    def check_complete(self) -> None:
        if self.finished is None:
            self._broken("no Finished")

    def _broken(self, what: str) -> None:
        log.error("the provider of %s broke the stream contract: %s", self._model, what)
        raise Internal(f"model '{self._model}' failed")


def to_chat_messages(messages: Sequence[llm_pb2.Message]) -> tuple[ChatMessage, ...]:
    if not messages:
        raise InvalidArgument("messages must not be empty")
    converted = tuple(to_chat_message(index, message) for index, message in enumerate(messages))
    total_chars = sum(
        len(message.content) + sum(len(call.arguments_json) for call in message.tool_calls) for message in converted
    )
    if total_chars > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"messages hold {total_chars} characters; the limit is {MAX_PROMPT_CHARS}")
    return converted


def to_chat_message(index: int, message: llm_pb2.Message) -> ChatMessage:
    role = ROLES.get(message.role)
    if role is None:
        raise InvalidArgument(f"messages[{index}].role must be system, user, assistant or tool")
    if role == Role.TOOL and not message.tool_call_id:
        raise InvalidArgument(f"messages[{index}] is a tool result without a tool_call_id")
    if message.tool_calls and role != Role.ASSISTANT:
        raise InvalidArgument(f"messages[{index}] has tool_calls but only assistant messages can")
    calls = []
    for position, call in enumerate(message.tool_calls):
        if not call.id or not call.name:
            raise InvalidArgument(f"messages[{index}].tool_calls[{position}] needs an id and a name")
        calls.append(ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_json))
    return ChatMessage(
        role=role,
        content=message.content,
        tool_calls=tuple(calls),
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def to_tool_definitions(tools: Sequence[llm_pb2.ToolDefinition]) -> tuple[ToolDefinition, ...]:
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"{len(tools)} tools offered; the limit is {MAX_TOOLS}")
    definitions = tuple(to_tool_definition(index, tool) for index, tool in enumerate(tools))
    names = [tool.name for tool in definitions]
    if len(set(names)) != len(names):
        raise InvalidArgument("tool names must be unique")
    return definitions


def to_tool_definition(index: int, tool: llm_pb2.ToolDefinition) -> ToolDefinition:
    if not TOOL_NAME.fullmatch(tool.name):
        raise InvalidArgument(f"tools[{index}].name must be 1-64 letters, digits, '_' or '-'")
    try:
        parameters = json.loads(tool.parameters_json_schema) if tool.parameters_json_schema else {}
    except ValueError:
        raise InvalidArgument(f"tools[{index}].parameters_json_schema is not valid JSON") from None
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"tools[{index}].parameters_json_schema must be a JSON object")
    # A tool without parameters still needs an object schema for OpenAI-style APIs.
    parameters = parameters or {"type": "object", "properties": {}}
    return ToolDefinition(name=tool.name, description=tool.description, parameters=parameters)


def check_embed_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    if not inputs:
        raise InvalidArgument("inputs must not be empty")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise InvalidArgument(f"{len(inputs)} inputs; the limit is {MAX_EMBED_INPUTS}")
    for index, text in enumerate(inputs):
        if not text.strip():
            raise InvalidArgument(f"inputs[{index}] is empty")
    total_chars = sum(len(text) for text in inputs)
    if total_chars > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"inputs hold {total_chars} characters; the limit is {MAX_PROMPT_CHARS}")
    return tuple(inputs)


def to_model_info(model: ModelDescription) -> llm_pb2.ModelInfo:
    return llm_pb2.ModelInfo(
        name=model.name,
        provider=model.provider,
        description=model.description,
        supports_tools=model.supports_tools,
        supports_embeddings=model.supports_embeddings,
        supports_transcription=model.supports_transcription,
        supports_speech=model.supports_speech,
        voices=model.voices,
        supports_generation=model.supports_generation,
    )


async def first_request(requests: AsyncIterator, name: str):
    """The call's first message, which must be its config."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgument(f"the call ended before its config: the first {name} must carry config") from None
    if first.WhichOneof("kind") != "config":
        raise InvalidArgument(f"the first {name} must carry config")
    return first


def to_encoding(value: int, field: str) -> AudioEncoding:
    encoding = ENCODINGS.get(value)
    if encoding is None:
        raise InvalidArgument(f"{field} {value} is not a known AudioEncoding")
    return encoding


TURN_DETECTIONS = (
    llm_pb2.TURN_DETECTION_UNSPECIFIED,
    llm_pb2.TURN_DETECTION_MANUAL,
    llm_pb2.TURN_DETECTION_SERVER_VAD,
)


async def transcribe_inputs(
    requests: AsyncIterator[llm_pb2.TranscribeRequest], limits: SpeechLimits
) -> AsyncIterator[TranscribeInput]:
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "audio":
            if len(request.audio) > limits.max_audio_message_bytes:
                raise InvalidArgument(
                    f"an audio message holds {len(request.audio)} bytes; the limit is "
                    f"{limits.max_audio_message_bytes}: send smaller pieces"
                )
            if request.audio:
                yield AudioInput(request.audio)
        elif kind == "commit":
            yield CommitInput()
        elif kind == "config":
            raise InvalidArgument("config comes once, in the first TranscribeRequest")
        else:
            raise InvalidArgument("a TranscribeRequest must carry config, audio or commit")


async def synthesize_texts(requests: AsyncIterator[llm_pb2.SynthesizeRequest]) -> AsyncIterator[str]:
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "text":
            if request.text:
                yield request.text
        elif kind == "config":
            raise InvalidArgument("config comes once, in the first SynthesizeRequest")
        else:
            raise InvalidArgument("a SynthesizeRequest must carry config or text")


def to_transcribe_response(event: TranscribeEvent) -> llm_pb2.TranscribeResponse:
    if isinstance(event, SpeechStartedEvent):
        return llm_pb2.TranscribeResponse(speech_started=llm_pb2.SpeechStarted(audio_ms=event.audio_ms))
    if isinstance(event, SpeechStoppedEvent):
        return llm_pb2.TranscribeResponse(speech_stopped=llm_pb2.SpeechStopped(audio_ms=event.audio_ms))
    return llm_pb2.TranscribeResponse(
        transcript=llm_pb2.Transcript(
            text=event.text, final=event.final, audio_ms=event.audio_ms, utterance=event.utterance
        )
    )


def to_synthesize_response(event: SynthesizeEvent) -> llm_pb2.SynthesizeResponse:
    if isinstance(event, SynthesisStartedEvent):
        audio_format = llm_pb2.AudioFormat(encoding=PROTO_ENCODINGS[event.encoding], sample_rate_hz=event.sample_rate)
        return llm_pb2.SynthesizeResponse(
            started=llm_pb2.SynthesizeStarted(model=event.model, voice=event.voice, format=audio_format)
        )
    if isinstance(event, AudioChunkEvent):
        return llm_pb2.SynthesizeResponse(
            audio=llm_pb2.AudioChunk(
                data=event.data, duration_ms=event.duration_ms, text_start=event.text_start, text_end=event.text_end
            )
        )
    assert isinstance(event, SynthesisFinishedEvent)
    return llm_pb2.SynthesizeResponse(
        finished=llm_pb2.SynthesizeFinished(audio_ms=event.audio_ms, characters=event.characters)
    )


def to_response(item: StreamItem) -> llm_pb2.GenerateResponse:
    if isinstance(item, Started):
        return llm_pb2.GenerateResponse(
            started=llm_pb2.GenerateStarted(model=item.model, prompt_tokens=item.prompt_tokens)
        )
    if isinstance(item, Chunk):
        chunk = llm_pb2.TextChunk(text=item.text, token_count=item.token_count)
        if item.produced_at_ns:
            chunk.produced_at.FromNanoseconds(item.produced_at_ns)
        return llm_pb2.GenerateResponse(chunk=chunk)
    if isinstance(item, ToolCallItem):
        call = item.tool_call
        return llm_pb2.GenerateResponse(
            tool_call=llm_pb2.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_json)
        )
    return llm_pb2.GenerateResponse(
        finished=llm_pb2.GenerateFinished(
            finish_reason=FINISH_REASONS[item.finish_reason],
            prompt_tokens=item.prompt_tokens,
            completion_tokens=item.completion_tokens,
        )
    )
