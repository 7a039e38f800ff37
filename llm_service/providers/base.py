"""The provider-neutral interface between the servicer and the model adapters.

Providers see plain dataclasses, never protos, so an adapter (the built-in demo, the offline speech
engines, the OpenAI SDK, ...) is written and tested without gRPC, and the servicer never learns which
adapter answers. Text models generate and embed; speech models transcribe (audio in, a transcript out)
or synthesize (one sentence in, a stream of PCM out). A ModelDescription says which of these a model
can do, and the registry only ever routes a request to a model that can.
"""

from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, cast

from duplex.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llm_service.audio import PCM_SAMPLE_BYTES, TRANSCRIPTION_SAMPLE_RATE


class Role(StrEnum):
    """Who wrote a message; the values are the role names OpenAI-style chat APIs use."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(StrEnum):
    """Why a reply ended; the values are the finish reasons OpenAI-style chat APIs use."""

    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asking for one tool to be run."""

    # Identifies the call; the tool's result names it.
    id: str
    name: str
    # The arguments as a JSON object, exactly as the model wrote them (it may be malformed).
    arguments_json: str


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A tool the model may call."""

    name: str
    description: str
    # The JSON Schema of the arguments object, already parsed.
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    # For an assistant message: the tools it asked for.
    tool_calls: tuple[ToolCall, ...] = ()
    # For a tool message: the call it answers, and the tool's name.
    tool_call_id: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    # The public model name, already resolved by the registry (never empty).
    model: str
    # The conversation, oldest first.
    messages: tuple[ChatMessage, ...]
    # Caps the reply's tokens; 0 means the model's default.
    max_tokens: int = 0
    # The tools the model may call in this reply.
    tools: tuple[ToolDefinition, ...] = ()
    # The most seconds one upstream request may take (what remains of the caller's deadline);
    # None means no deadline, and the provider's own timeouts apply.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """First item of every reply stream."""

    model: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """The next piece of the reply; text is appended to what came before."""

    text: str
    token_count: int
    # When the model produced the text's first token (Unix time in ns), so delivery latency can be
    # measured; 0 lets the router stamp it as the chunk arrives from the provider.
    produced_at_ns: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallItem:
    """One complete tool call, after the text and before Finished (whose reason is then TOOL_CALLS)."""

    tool_call: ToolCall


@dataclass(frozen=True, slots=True)
class Finished:
    """Last item of every reply stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


StreamItem = Started | Chunk | ToolCallItem | Finished


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    # The public model name, already resolved by the registry.
    model: str
    # The texts to embed; one vector comes back per text, in order.
    inputs: tuple[str, ...]
    # As GenerationRequest.timeout.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int




@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    """One utterance to transcribe."""

    # The public model name, already resolved by the registry.
    model: str
    # The utterance: PCM16 mono at `sample_rate` (the service decodes and resamples every input format).
    pcm16: bytes
    sample_rate: int = TRANSCRIPTION_SAMPLE_RATE
    # The spoken language (ISO 639-1); empty lets the model decide.
    language: str = ""
    # Stream TranscriptDeltas while transcribing, where the model can (interim results were asked for).
    stream: bool = False
    # An interim pass over the utterance so far: the provider yields nothing at all when its engine is
    # busy, so interim work never queues behind (or ahead of) real work.
    best_effort: bool = False
    # As GenerationRequest.timeout.
    timeout: float | None = None

    @property
    def duration_seconds(self) -> float:
        return len(self.pcm16) / PCM_SAMPLE_BYTES / self.sample_rate


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    """More text of the transcript (streaming models); appended to the deltas before it."""

    text: str


@dataclass(frozen=True, slots=True)
class TranscriptDone:
    """The whole transcript of the utterance; the last item of a transcription stream."""

    text: str


TranscriptItem = TranscriptDelta | TranscriptDone


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """One sentence to speak."""

    # The public model name, already resolved by the registry.
    model: str
    # One of the model's voices (or, for a model that lists none, whatever its upstream accepts).
    voice: str
    text: str
    # As GenerationRequest.timeout.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """The next piece of a sentence's speech: PCM16 mono, whole samples, at `sample_rate`."""

    pcm16: bytes
    sample_rate: int
    # True when the provider knows this is the sentence's last piece (the stream ends after it), so the
    # service knows the sentence's length before cutting it into chunks.
    last: bool = False

    @property
    def duration_seconds(self) -> float:
        return len(self.pcm16) / PCM_SAMPLE_BYTES / self.sample_rate


class InterimTranscripts(StrEnum):
    """How a transcription model gives interim results."""

    # It cannot: only final transcripts.
    NONE = "none"
    # Its transcription streams TranscriptDeltas (e.g. OpenAI's gpt-4o-transcribe with stream=true).
    STREAMED = "streamed"
    # The service transcribes the utterance so far again, now and then, while the engine is idle.
    REPEATED = "repeated"


@dataclass(frozen=True, slots=True)
class ModelDescription:
    # The public name clients ask for.
    name: str
    # The adapter that serves it ("local", "openai").
    provider: str
    # What it is, for people.
    description: str
    # Whether the model can call tools; tools offered to a model that cannot are not passed on.
    supports_tools: bool = False
    # Whether Embed works with it.
    supports_embeddings: bool = False
    # Models tried in order when this one stays unavailable after its retries; each can do what it does.
    fallbacks: tuple[str, ...] = ()
    # Whether Generate works with it; False for speech-only models.
    supports_generation: bool = True
    # Whether Transcribe works with it, and how it gives interim results.
    supports_transcription: bool = False
    interim_transcripts: InterimTranscripts = InterimTranscripts.NONE
    # The languages it transcribes (ISO 639-1); empty means any.
    languages: tuple[str, ...] = ()
    # Whether Synthesize works with it, and its voices (the first is its default; empty: any the
    # upstream accepts, and a request must name one).
    supports_speech: bool = False
    voices: tuple[str, ...] = ()
    # The rate its speech comes at (Hz); 0 when only its audio will tell.
    speech_sample_rate: int = 0

    def can(self, capability: "Capability") -> bool:
        return bool(getattr(self, capability.value))


class Capability(StrEnum):
    """What a request needs a model to do; the value is the ModelDescription flag that says it can."""

    GENERATION = "supports_generation"
    EMBEDDINGS = "supports_embeddings"
    TRANSCRIPTION = "supports_transcription"
    SPEECH = "supports_speech"


# How each capability is named in errors: "model 'x' does not support <this>".
CAPABILITY_NAMES = {
    Capability.GENERATION: "text generation",
    Capability.EMBEDDINGS: "embeddings",
    Capability.TRANSCRIPTION: "transcription",
    Capability.SPEECH: "speech synthesis",
}


class ModelProvider(Protocol):
    """What every adapter has: a name, the models it serves, and a close."""

    name: str

    def models(self) -> list[ModelDescription]: ...

    async def close(self) -> None: ...


class TranscriptionProvider(ModelProvider, Protocol):
    """An adapter serving transcription models.

    `transcribe` is an async generator yielding TranscriptDeltas (only when request.stream and the model
    streams), then exactly one TranscriptDone; for a best_effort request whose engine is busy it yields
    nothing. Like `generate`, it closes its upstream request when closed or cancelled, reports failures
    as duplex errors (ResourceExhausted/Unavailable: worth another attempt) and never retries by itself.
    """

    def transcribe(self, request: TranscriptionRequest) -> AsyncGenerator[TranscriptItem, None]: ...


class SpeechProvider(ModelProvider, Protocol):
    """An adapter serving text-to-speech models.

    `synthesize` is an async generator yielding the sentence's speech as SpeechAudio pieces, in order, at
    one sample rate; otherwise it behaves like `generate` (closes its upstream when closed or cancelled,
    reports duplex errors, never retries).
    """

    def synthesize(self, request: SpeechRequest) -> AsyncGenerator[SpeechAudio, None]: ...


class Provider(ModelProvider, Protocol):
    """A text model adapter. One provider may serve several public model names.

    `generate` is an async generator yielding exactly one Started, then Chunks, then the complete
    ToolCallItems if the model asks for tools, then exactly one Finished. It must stop promptly when closed
    or cancelled (the caller closes it when the client goes away) and close its upstream request then.
    It reports failures as duplex.common.errors exceptions: ResourceExhausted and Unavailable mean "try
    again" (the caller retries them), anything else is final. It never retries by itself.
    """

    def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]: ...

    async def embed(self, request: EmbeddingRequest) -> Embeddings: ...


AnyProvider = Provider | TranscriptionProvider | SpeechProvider


class ProviderRegistry:
    """Routes a public model name to the provider that serves it, for what the request needs it to do."""

    def __init__(
        self,
        providers: Iterable[AnyProvider],
        default_model: str,
        default_embedding_model: str = "",
        default_transcription_model: str = "",
        default_speech_model: str = "",
    ):
        self._models: dict[str, ModelDescription] = {}
        self._providers: dict[str, AnyProvider] = {}
        for provider in providers:
            for model in provider.models():
                self._add(model, provider)
        # Configuration mistakes fail at startup rather than on every request.
        if default_model not in self._providers:
            raise ValueError(f"default model {default_model!r} is not served by any provider")
        if not self._models[default_model].supports_generation:
            raise ValueError(f"default model {default_model!r} cannot generate text")
        self._check_fallbacks()
        self.default_model = default_model
        self.default_embedding_model = default_embedding_model or self._first(Capability.EMBEDDINGS)
        if self.default_embedding_model and not self._models[self.default_embedding_model].supports_embeddings:
            raise ValueError(f"default embedding model {self.default_embedding_model!r} cannot embed")
        self.default_transcription_model = self._speech_default(default_transcription_model, Capability.TRANSCRIPTION)
        self.default_speech_model = self._speech_default(default_speech_model, Capability.SPEECH)

    def _add(self, model: ModelDescription, provider: AnyProvider) -> None:
        if model.name in self._providers:
            raise ValueError(f"model {model.name!r} is served by two providers")
        self._models[model.name] = model
        self._providers[model.name] = provider

    def _check_fallbacks(self) -> None:
        for model in self._models.values():
            for fallback in model.fallbacks:
                if fallback == model.name or fallback not in self._models:
                    raise ValueError(f"model {model.name!r} falls back to {fallback!r}, which is not another model")
                # A fallback stands in for the model, so it must do what the model does.
                for capability in (Capability.GENERATION, Capability.TRANSCRIPTION, Capability.SPEECH):
                    if model.can(capability) and not self._models[fallback].can(capability):
                        raise ValueError(
                            f"model {model.name!r} falls back to {fallback!r}, "
                            f"which does not support {CAPABILITY_NAMES[capability]}"
                        )

    def _first(self, capability: Capability) -> str:
        return next((model.name for model in self._models.values() if model.can(capability)), "")

    def _speech_default(self, name: str, capability: Capability) -> str:
        """The default model of a speech capability; empty when no provider serves one at all (a registry
        of text providers only, as tests build), an error when it names a model that cannot."""
        if not self._first(capability):
            return ""
        if not name:
            return self._first(capability)
        description = self._models.get(name)
        if description is None or not description.can(capability):
            raise ValueError(f"default {CAPABILITY_NAMES[capability]} model {name!r} is not served by any provider")
        return name

    def resolve(self, model: str) -> tuple[ModelDescription, AnyProvider]:
        """The model (the default when empty) and its provider; NotFound when nobody serves it."""
        name = model or self.default_model
        provider = self._providers.get(name)
        if provider is None:
            raise NotFound(f"model '{name}' not found")
        return self._models[name], provider

    def resolve_for(self, model: str, capability: Capability) -> tuple[ModelDescription, AnyProvider]:
        """As resolve, with the capability's default model; InvalidArgument when the model cannot do it."""
        defaults = {
            Capability.GENERATION: self.default_model,
            Capability.EMBEDDINGS: self.default_embedding_model,
            Capability.TRANSCRIPTION: self.default_transcription_model,
            Capability.SPEECH: self.default_speech_model,
        }
        name = model or defaults[capability]
        if not name:
            raise FailedPrecondition(f"no model for {CAPABILITY_NAMES[capability]} is configured")
        description, provider = self.resolve(name)
        if not description.can(capability):
            raise InvalidArgument(f"model '{description.name}' does not support {CAPABILITY_NAMES[capability]}")
        return description, provider

    def resolve_generation(self, model: str) -> tuple[ModelDescription, Provider]:
        description, provider = self.resolve_for(model, Capability.GENERATION)
        return description, cast(Provider, provider)

    def resolve_embedding(self, model: str) -> tuple[ModelDescription, Provider]:
        """As resolve, for Embed: InvalidArgument when the model cannot embed."""
        description, provider = self.resolve_for(model, Capability.EMBEDDINGS)
        return description, cast(Provider, provider)

    def resolve_transcription(self, model: str) -> tuple[ModelDescription, TranscriptionProvider]:
        description, provider = self.resolve_for(model, Capability.TRANSCRIPTION)
        return description, cast(TranscriptionProvider, provider)

    def resolve_speech(self, model: str) -> tuple[ModelDescription, SpeechProvider]:
        description, provider = self.resolve_for(model, Capability.SPEECH)
        return description, cast(SpeechProvider, provider)

    def models(self) -> list[ModelDescription]:
        return list(self._models.values())
