"""Model providers behind the LLM service, and the registry that routes model names to them."""

from llm_service.providers.base import (
    ChatMessage,
    Chunk,
    EmbeddingRequest,
    Embeddings,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelDescription,
    Provider,
    ProviderRegistry,
    Role,
    Started,
    StreamItem,
    ToolCall,
    ToolCallItem,
    ToolDefinition,
)
from llm_service.providers.local import LocalProvider
from llm_service.providers.openai_provider import OpenAIModel, OpenAIProvider

__all__ = [
    "ChatMessage",
    "Chunk",
    "EmbeddingRequest",
    "Embeddings",
    "FinishReason",
    "Finished",
    "GenerationRequest",
    "LocalProvider",
    "ModelDescription",
    "OpenAIModel",
    "OpenAIProvider",
    "Provider",
    "ProviderRegistry",
    "Role",
    "Started",
    "StreamItem",
    "ToolCall",
    "ToolCallItem",
    "ToolDefinition",
]
