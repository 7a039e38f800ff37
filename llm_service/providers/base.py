"""The provider-neutral interface between the servicer and the model adapters.

Providers see plain dataclasses, never protos, so an adapter (the built-in demo, the OpenAI SDK, ...) is
written and tested without gRPC, and the servicer never learns which adapter answers.
"""

from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from duplex.common.errors import InvalidArgument, NotFound


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
    # Models tried in order when this one stays unavailable after its retries.
    fallbacks: tuple[str, ...] = ()


class Provider(Protocol):
    """A model adapter. One provider may serve several public model names.

    `generate` is an async generator yielding exactly one Started, then Chunks, then the complete
    ToolCallItems if the model asks for tools, then exactly one Finished. It must stop promptly when closed
    or cancelled (the caller closes it when the client goes away) and close its upstream request then.
    It reports failures as duplex.common.errors exceptions: ResourceExhausted and Unavailable mean "try
    again" (the caller retries them), anything else is final. It never retries by itself.
    """

    name: str

    def models(self) -> list[ModelDescription]: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]: ...

    async def embed(self, request: EmbeddingRequest) -> Embeddings: ...

    async def close(self) -> None: ...


class ProviderRegistry:
    """Routes a public model name to the provider that serves it."""

    def __init__(self, providers: Iterable[Provider], default_model: str, default_embedding_model: str = ""):
        self._models: dict[str, ModelDescription] = {}
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            for model in provider.models():
                self._add(model, provider)
        # Configuration mistakes fail at startup rather than on every request.
        if default_model not in self._providers:
            raise ValueError(f"default model {default_model!r} is not served by any provider")
        self._check_fallbacks()
        self.default_model = default_model
        self.default_embedding_model = default_embedding_model or self._first_embedding_model()
        if self.default_embedding_model and not self._models[self.default_embedding_model].supports_embeddings:
            raise ValueError(f"default embedding model {self.default_embedding_model!r} cannot embed")

    def _add(self, model: ModelDescription, provider: Provider) -> None:
        if model.name in self._providers:
            raise ValueError(f"model {model.name!r} is served by two providers")
        self._models[model.name] = model
        self._providers[model.name] = provider

    def _check_fallbacks(self) -> None:
        for model in self._models.values():
            for fallback in model.fallbacks:
                if fallback == model.name or fallback not in self._models:
                    raise ValueError(f"model {model.name!r} falls back to {fallback!r}, which is not another model")

    def _first_embedding_model(self) -> str:
        return next((model.name for model in self._models.values() if model.supports_embeddings), "")

    def resolve(self, model: str) -> tuple[ModelDescription, Provider]:
        """The model (the default when empty) and its provider; NotFound when nobody serves it."""
        name = model or self.default_model
        provider = self._providers.get(name)
        if provider is None:
            raise NotFound(f"model '{name}' not found")
        return self._models[name], provider

    def resolve_embedding(self, model: str) -> tuple[ModelDescription, Provider]:
        """As resolve, for Embed: InvalidArgument when the model cannot embed."""
        description, provider = self.resolve(model or self.default_embedding_model)
        if not description.supports_embeddings:
            raise InvalidArgument(f"model '{description.name}' does not support embeddings")
        return description, provider

    def models(self) -> list[ModelDescription]:
        return list(self._models.values())
