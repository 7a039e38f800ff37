"""The provider-neutral interface between the servicer and the model adapters.

Providers see plain dataclasses, never protos, so an adapter (the built-in demo, the OpenAI SDK, ...) is
written and tested without gRPC, and the servicer never learns which adapter answers.
"""

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from duplex.common.errors import NotFound


class Role(StrEnum):
    """Who wrote a message; the values are the role names OpenAI-style chat APIs use."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why a reply ended; the values are the finish reasons OpenAI-style chat APIs use."""

    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    # The public model name, already resolved by the registry (never empty).
    model: str
    # The conversation, oldest first.
    messages: tuple[ChatMessage, ...]
    # Caps the reply's tokens; 0 means the model's default.
    max_tokens: int = 0


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


@dataclass(frozen=True, slots=True)
class Finished:
    """Last item of every reply stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


StreamItem = Started | Chunk | Finished


@dataclass(frozen=True, slots=True)
class ModelDescription:
    # The public name clients ask for.
    name: str
    # The adapter that serves it ("local", "openai").
    provider: str
    # What it is, for people.
    description: str


class Provider(Protocol):
    """A model adapter. One provider may serve several public model names.

    `generate` is an async generator yielding exactly one Started, then Chunks, then exactly one Finished.
    It must stop promptly when closed or cancelled (the caller closes it when the client goes away), and
    it reports failures as duplex.common.errors exceptions (e.g. Unavailable when the upstream is down).
    """

    name: str

    def models(self) -> list[ModelDescription]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def close(self) -> None: ...


class ProviderRegistry:
    """Routes a public model name to the provider that serves it."""

    def __init__(self, providers: Iterable[Provider], default_model: str):
        self._models: dict[str, ModelDescription] = {}
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            for model in provider.models():
                self._add(model, provider)
        if default_model not in self._providers:
            # A configuration mistake: fail at startup rather than on every request without a model.
            raise ValueError(f"default model {default_model!r} is not served by any provider")
        self.default_model = default_model

    def _add(self, model: ModelDescription, provider: Provider) -> None:
        if model.name in self._providers:
            raise ValueError(f"model {model.name!r} is served by two providers")
        self._models[model.name] = model
        self._providers[model.name] = provider

    def resolve(self, model: str) -> tuple[str, Provider]:
        """The public model name (the default when empty) and its provider; NotFound when nobody serves it."""
        name = model or self.default_model
        provider = self._providers.get(name)
        if provider is None:
            raise NotFound(f"model '{name}' not found")
        return name, provider

    def models(self) -> list[ModelDescription]:
        return list(self._models.values())
