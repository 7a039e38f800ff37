"""`duplex.llm.v1.LlmService`: validates requests, routes them to a provider, streams its reply back.

The only place that knows both the protos and the provider dataclasses. Errors are raised as
duplex.common.errors exceptions; the server's ErrorInterceptor turns them into statuses.
"""

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc

from duplex.common.errors import Internal, InvalidArgument
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.providers.base import (
    ChatMessage,
    Chunk,
    Finished,
    FinishReason,
    GenerationRequest,
    ProviderRegistry,
    Role,
    Started,
    StreamItem,
)

log = logging.getLogger(__name__)

# Bounds the work one request can cause; far beyond any context window a provider accepts.
MAX_PROMPT_CHARS = 1_000_000

ROLES = {
    llm_pb2.ROLE_SYSTEM: Role.SYSTEM,
    llm_pb2.ROLE_USER: Role.USER,
    llm_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
}
FINISH_REASONS = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: llm_pb2.FINISH_REASON_CONTENT_FILTER,
}


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, registry: ProviderRegistry):
        self._registry = registry

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        messages = to_chat_messages(request.messages)
        model, provider = self._registry.resolve(request.model)
        generation = GenerationRequest(model=model, messages=messages, max_tokens=request.max_tokens)
        order = StreamOrder(model)
        # aclosing: however the call ends (finished, failed, cancelled by the client), the provider's
        # stream is closed right then, so its upstream request does not outlive the call.
        async with aclosing(provider.generate(generation)) as stream:
            async for item in stream:
                order.check(item)
                yield to_response(item)
        order.check_complete()
        log.debug("generated with %s: %s", model, order.finished)

    async def ListModels(
        self, request: llm_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.ListModelsResponse:
        models = [
            llm_pb2.ModelInfo(name=model.name, provider=model.provider, description=model.description)
            for model in self._registry.models()
        ]
        return llm_pb2.ListModelsResponse(models=models, default_model=self._registry.default_model)


class StreamOrder:
    """Checks that a provider keeps the stream contract: one Started, Chunks, one Finished, nothing after.

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
        elif not isinstance(item, Chunk):
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
    total_chars = 0
    converted = []
    for index, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(f"messages[{index}].role must be system, user or assistant")
        total_chars += len(message.content)
        converted.append(ChatMessage(role=role, content=message.content))
    if total_chars > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"messages hold {total_chars} characters; the limit is {MAX_PROMPT_CHARS}")
    return tuple(converted)


def to_response(item: StreamItem) -> llm_pb2.GenerateResponse:
    if isinstance(item, Started):
        return llm_pb2.GenerateResponse(
            started=llm_pb2.GenerateStarted(model=item.model, prompt_tokens=item.prompt_tokens)
        )
    if isinstance(item, Chunk):
        return llm_pb2.GenerateResponse(chunk=llm_pb2.TextChunk(text=item.text, token_count=item.token_count))
    return llm_pb2.GenerateResponse(
        finished=llm_pb2.GenerateFinished(
            finish_reason=FINISH_REASONS[item.finish_reason],
            prompt_tokens=item.prompt_tokens,
            completion_tokens=item.completion_tokens,
        )
    )
