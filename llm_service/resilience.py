"""Retries, fallbacks and deadlines for every provider, in one place.

Providers make exactly one upstream attempt and report what went wrong as typed errors; this module
decides what happens next:

- before the reply's first token or tool call, ResourceExhausted and Unavailable are retried with
  exponential backoff and full jitter, waiting at least as long as the upstream's Retry-After asked;
  when a model's retries are used up, the next model of its `fallbacks` is tried;
- after the first token, nothing is retried (the client already shows part of a reply): the failure
  becomes Unavailable, which is retryable, so the caller can keep the partial text and offer a retry;
- everything happens within the call's deadline: each attempt gets what remains of it, no backoff
  sleeps past it, and when it passes the upstream request is closed and DeadlineExceeded raised.

Speech follows the same rules per call: a Transcribe or Synthesize call retries and falls back until it
has sent its first transcript or audio chunk (`retry=True`); after that each upstream request gets one
attempt, and its failure is Unavailable.
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar, cast

from duplex.common.errors import DeadlineExceeded, DuplexError, ResourceExhausted, Unavailable
from llm_service.providers.base import (
    AnyProvider,
    Capability,
    Chunk,
    EmbeddingRequest,
    Embeddings,
    GenerationRequest,
    ModelDescription,
    Provider,
    ProviderRegistry,
    SpeechProvider,
    SpeechRequest,
    Started,
    StreamItem,
    TranscriptDone,
    TranscriptionProvider,
    TranscriptionRequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

# The errors worth another attempt: the upstream may well answer a moment later.
TRANSIENT_ERRORS = (ResourceExhausted, Unavailable)


class Deadline:
    """The moment a call must be over by, on the event loop's clock; `None` means the call has none."""

    def __init__(self, seconds: float | None):
        self._loop = asyncio.get_running_loop()
        self._at = None if seconds is None else self._loop.time() + max(seconds, 0.0)

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return max(self._at - self._loop.time(), 0.0)

    @property
    def expired(self) -> bool:
        return self.remaining() == 0.0

    def allows(self, delay: float) -> bool:
        """Whether waiting `delay` seconds still leaves time for another attempt."""
        remaining = self.remaining()
        return remaining is None or delay < remaining

    async def run(self, awaitable: Awaitable[T], what: str) -> T:
        """Await within the deadline; when it passes, the awaitable is cancelled and DeadlineExceeded raised.

        Used around single awaits only, never around a `yield`, so the timeout can only ever cancel the
        work it guards.
        """
        remaining = self.remaining()
        if remaining is None:
            return await awaitable
        try:
            async with asyncio.timeout(remaining):
                return await awaitable
        except TimeoutError:
            raise DeadlineExceeded(f"the deadline passed while waiting for {what}") from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # Attempts per model, the first one included; 1 disables retries.
    max_attempts: int = 3
    # The backoff before the n-th retry is uniform in [0, min(max_delay, base_delay * 2**(n-1))].
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempts_made: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None to give up on this model."""
        if attempts_made >= self.max_attempts:
            return None
        if retry_after is not None:
            # The upstream said when it will answer again: never sooner, and not at all when that is
            # longer than any backoff we would wait (the error then carries the hint to the client).
            return retry_after if retry_after <= self.max_delay else None
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempts_made - 1)))


@dataclass(slots=True)
class OpenedReply:
    """A reply stream that has produced its first token or tool call, and the items read so far."""

    stream: AsyncGenerator[StreamItem, None]
    head: list[StreamItem]


@dataclass(slots=True)
class OpenedStream:
    """A speech stream that has produced its first item (None: it ended without one), and who answers."""

    model: ModelDescription
    stream: AsyncGenerator[Any, None]
    head: Any
    # For speech: the voice that speaks (the fallback's default when it lacks the one asked for).
    voice: str = ""


class ModelRouter:
    """Runs generations and embeddings against the registry's providers, with retries and fallbacks."""

    def __init__(self, registry: ProviderRegistry, policy: RetryPolicy, rng: random.Random | None = None):
        self._registry = registry
        self._policy = policy
        self._rng = rng or random.Random()

    @property
    def default_model(self) -> str:
        return self._registry.default_model

    def models(self) -> list[ModelDescription]:
        return self._registry.models()

    @property
    def default_transcription_model(self) -> str:
        return self._registry.default_transcription_model

    @property
    def default_speech_model(self) -> str:
        return self._registry.default_speech_model

    def resolve(self, model: str, capability: Capability = Capability.GENERATION) -> ModelDescription:
        """The model a request names (its capability's default when empty), checked to be able to do it."""
        return self._registry.resolve_for(model, capability)[0]

    async def generate(self, request: GenerationRequest, deadline: Deadline) -> AsyncGenerator[StreamItem, None]:
        """The reply of request.model or of one of its fallbacks; Started names the model that answers."""
        opened = await self._open_with_fallbacks(request, deadline)
        model = next((item.model for item in opened.head if isinstance(item, Started)), request.model)
        async with aclosing(opened.stream) as stream:
            for item in opened.head:
                yield item
            while True:
                try:
                    item = await self._next(stream, deadline, model)
                except StopAsyncIteration:
                    return
                except DeadlineExceeded:
                    raise
                except DuplexError as error:
                    # Part of the reply is out and a retry would repeat it: no retry here, but a
                    # retryable error, so the caller can keep the partial text and offer to try again.
                    log.warning("the reply of model %s broke off: %s", model, error.message)
                    raise as_unavailable(error) from None
                yield item

    async def embed(self, model: str, inputs: tuple[str, ...], deadline: Deadline) -> tuple[str, Embeddings]:
        """Embeddings from `model` (the default embedding model when empty), retried but never replaced.

        No fallback here: another model's vectors live in another space and would silently mismatch.
        """
        description, provider = self._registry.resolve_embedding(model)

        async def attempt() -> Embeddings:
            request = EmbeddingRequest(model=description.name, inputs=inputs, timeout=deadline.remaining())
            return await deadline.run(provider.embed(request), f"model '{description.name}'")

        return description.name, await self._with_retries(description.name, attempt, deadline)

    async def open_transcription(
        self, request: TranscriptionRequest, deadline: Deadline, *, retry: bool
    ) -> OpenedStream:
        """The transcription of an utterance by request.model or, with `retry`, one of its fallbacks, read
        up to its first item; without `retry`, one attempt whose failure is Unavailable."""
        requested, _ = self._registry.resolve_transcription(request.model)

        async def attempt(model: ModelDescription, provider: AnyProvider) -> OpenedStream:
            transcriber = cast(TranscriptionProvider, provider)
            stream = transcriber.transcribe(replace(request, model=model.name, timeout=deadline.remaining()))
            return await self._open_stream(model, stream, deadline)

        return await self._first_answer(requested, attempt, deadline, retry=retry)

    async def open_speech(self, request: SpeechRequest, deadline: Deadline, *, retry: bool) -> OpenedStream:
        """The speech of a sentence by request.model or, with `retry`, one of its fallbacks, read up to its
        first SpeechAudio; without `retry`, one attempt whose failure is Unavailable."""
        requested, _ = self._registry.resolve_speech(request.model)

        async def attempt(model: ModelDescription, provider: AnyProvider) -> OpenedStream:
            voice = request.voice if not model.voices or request.voice in model.voices else model.voices[0]
            speaker = cast(SpeechProvider, provider)
            stream = speaker.synthesize(replace(request, model=model.name, voice=voice, timeout=deadline.remaining()))
            opened = await self._open_stream(model, stream, deadline)
            opened.voice = voice
            return opened

        return await self._first_answer(requested, attempt, deadline, retry=retry)

    async def follow(self, opened: OpenedStream, deadline: Deadline) -> AsyncGenerator[Any, None]:
        """The items of an opened speech stream, its head first; a failure on the way is Unavailable."""
        async with aclosing(opened.stream) as stream:
            if opened.head is None:
                return
            yield opened.head
            while True:
                try:
                    item = await deadline.run(anext(stream), f"model '{opened.model.name}'")
                except StopAsyncIteration:
                    return
                except DeadlineExceeded:
                    raise
                except DuplexError as error:
                    log.warning("the speech stream of model %s broke off: %s", opened.model.name, error.message)
                    raise as_unavailable(error) from None
                yield item

    async def interim_transcript(self, request: TranscriptionRequest, deadline: Deadline) -> str | None:
        """A best-effort transcript of the utterance so far: one attempt, on request.model only; None when
        its engine is busy or it fails (an interim result is never worth a retry or an error)."""
        _, provider = self._registry.resolve_transcription(request.model)
        stream = provider.transcribe(replace(request, best_effort=True, timeout=deadline.remaining()))
        text = None
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    if isinstance(item, TranscriptDone):
                        text = item.text
        except DuplexError as error:
            log.info("an interim transcript of model %s failed: %s", request.model, error.message)
            return None
        return text

    async def _open_with_fallbacks(self, request: GenerationRequest, deadline: Deadline) -> OpenedReply:
        requested, _ = self._registry.resolve_generation(request.model)

        async def attempt(model: ModelDescription, provider: AnyProvider) -> OpenedReply:
            return await self._open(model, cast(Provider, provider), request, deadline)

        return await self._first_answer(requested, attempt, deadline, retry=True)

    async def _first_answer(
        self,
        requested: ModelDescription,
        attempt: Callable[[ModelDescription, AnyProvider], Awaitable[T]],
        deadline: Deadline,
        *,
        retry: bool,
    ) -> T:
        """The first model of requested's chain (itself, then its fallbacks) that answers, each retried;
        without `retry` only the model itself, once."""
        if not retry:
            _, provider = self._registry.resolve(requested.name)
            try:
                return await attempt(requested, provider)
            except DeadlineExceeded:
                raise
            except DuplexError as error:
                log.warning("model %s failed after the call's first output: %s", requested.name, error.message)
                raise as_unavailable(error) from None
        chain = (requested.name, *requested.fallbacks)
        for position, name in enumerate(chain):
            model, provider = self._registry.resolve(name)
            try:
                return await self._with_retries(name, partial(attempt, model, provider), deadline)
            except TRANSIENT_ERRORS as error:
                if position + 1 == len(chain) or deadline.expired:
                    raise
                log.warning("model %s is unavailable (%s); trying %s", name, error.message, chain[position + 1])
        raise AssertionError("unreachable: the chain is never empty")

    async def _open_stream(
        self, model: ModelDescription, stream: AsyncGenerator[Item, None], deadline: Deadline
    ) -> OpenedStream:
        """One attempt at a speech stream: read its first item (closing it if that fails)."""
        try:
            head = await deadline.run(anext(stream), f"model '{model.name}'")
        except StopAsyncIteration:
            return OpenedStream(model, stream, None)
        except BaseException:
            await stream.aclose()
            raise
        return OpenedStream(model, stream, head)

    async def _open(
        self, model: ModelDescription, provider: Provider, request: GenerationRequest, deadline: Deadline
    ) -> OpenedReply:
        """One attempt: start the reply and read up to its first token, tool call or finish."""
        attempt = replace(
            request,
            model=model.name,
            timeout=deadline.remaining(),
            # A model that cannot call tools still answers, in text.
            tools=request.tools if model.supports_tools else (),
        )
        stream = provider.generate(attempt)
        head: list[StreamItem] = []
        try:
            while not head or isinstance(head[-1], Started):
                head.append(await self._next(stream, deadline, model.name))
        except StopAsyncIteration:
            pass  # a stream that ends early breaks the contract; the servicer reports it
        except BaseException:
            await stream.aclose()
            raise
        return OpenedReply(stream, head)

    @staticmethod
    async def _next(stream: AsyncGenerator[StreamItem, None], deadline: Deadline, model: str) -> StreamItem:
        """The provider's next item within the deadline; chunks get their production time if they lack one."""
        item = await deadline.run(anext(stream), f"model '{model}'")
        if isinstance(item, Chunk) and not item.produced_at_ns:
            return replace(item, produced_at_ns=time.time_ns())
        return item

    async def _with_retries(self, model: str, attempt: Callable[[], Awaitable[T]], deadline: Deadline) -> T:
        attempts_made = 0
        while True:
            if deadline.expired:
                raise DeadlineExceeded(f"the deadline passed before model '{model}' answered")
            attempts_made += 1
            try:
                return await attempt()
            except TRANSIENT_ERRORS as error:
                delay = self._policy.delay(attempts_made, error.retry_after, self._rng)
                if delay is None or not deadline.allows(delay):
                    raise
                log.warning("model %s, attempt %d: %s; retrying in %.2fs", model, attempts_made, error.message, delay)
                await asyncio.sleep(delay)


def as_unavailable(error: DuplexError) -> Unavailable:
    """The error of an upstream that failed after part of the answer was out: retryable by the caller."""
    return error if isinstance(error, Unavailable) else Unavailable(error.message)
