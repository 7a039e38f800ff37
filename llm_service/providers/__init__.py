"""Model providers behind the LLM service, and the registry that routes model names to them."""

from llm_service.providers.base import (
    ChatMessage,
    Chunk,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelDescription,
    Provider,
    ProviderRegistry,
    Role,
    Started,
    StreamItem,
)
from llm_service.providers.local import LocalProvider

__all__ = [
    "ChatMessage",
    "Chunk",
    "FinishReason",
    "Finished",
    "GenerationRequest",
    "LocalProvider",
    "ModelDescription",
    "Provider",
    "ProviderRegistry",
    "Role",
    "Started",
    "StreamItem",
]
