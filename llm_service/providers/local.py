"""`local`: Duplex's built-in demo model. Deterministic, offline, and NOT a language model.

It answers from a template filled in from the conversation (the latest user message, how many messages
the user has sent, the first one), so a client can see that context travels end to end, and the same
conversation always gets the same reply, byte for byte, which makes it usable in tests.
"""

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence

from llm_service.providers.base import (
    ChatMessage,
    Chunk,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelDescription,
    Role,
    Started,
    StreamItem,
)

log = logging.getLogger(__name__)

PROVIDER_NAME = "local"
MODEL_NAME = "local-demo"
MODEL_DESCRIPTION = (
    "Duplex's built-in demo model: deterministic and offline; it echoes the conversation from a "
    "template and is not a language model."
)
# Quotes of user messages are cut to this many characters, so one huge message cannot flood the reply.
QUOTE_MAX_CHARS = 80

INTRODUCTION = "I am Duplex's built-in demo model, not a language model, so I cannot really answer you."
# Appended in turn (and again from the top) until the reply is long enough to be worth streaming.
PADDING_SENTENCES = (
    "The same conversation always gets the same reply from me, word for word.",
    "Each word arrives as its own piece of a stream at a steady pace, so you can watch it and stop it.",
    "Nothing I say leaves this machine: there is no network call, no API key and no model behind me.",
    f"For real answers, pick a model served by a configured provider instead of {MODEL_NAME}.",
)

# A token is a word plus the whitespace that follows it, so joining the tokens gives back the text.
_TOKEN = re.compile(r"\S+\s*")


class LocalProvider:
    """Serves `local-demo`. `active_generations` counts replies still streaming (cancelled ones stop)."""

    name = PROVIDER_NAME

    def __init__(self, *, tokens_per_second: float, min_reply_tokens: int, tokens_per_chunk: int = 1):
        self._tokens_per_second = tokens_per_second
        self._min_reply_tokens = min_reply_tokens
        self._tokens_per_chunk = tokens_per_chunk
        self.active_generations = 0

    def models(self) -> list[ModelDescription]:
        return [ModelDescription(name=MODEL_NAME, provider=PROVIDER_NAME, description=MODEL_DESCRIPTION)]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        tokens = split_tokens(compose_reply(request.messages, self._min_reply_tokens))
        reply, finish_reason = cap_tokens(tokens, request.max_tokens)
        prompt_tokens = estimate_prompt_tokens(request.messages)
        self.active_generations += 1
        try:
            yield Started(model=request.model, prompt_tokens=prompt_tokens)
            pacer = Pacer(self._tokens_per_second)
            sent = 0
            for start in range(0, len(reply), self._tokens_per_chunk):
                piece = reply[start : start + self._tokens_per_chunk]
                sent += len(piece)
                await pacer.wait_for_token(sent)
                yield Chunk(text="".join(piece), token_count=len(piece))
            yield Finished(finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=sent)
        finally:
            self.active_generations -= 1

    async def close(self) -> None:
        """Nothing to release: the demo holds no connections."""


class Pacer:
    """Releases token n at start + n / rate.

    An absolute schedule: a late wake-up or a slow consumer makes the next tokens due sooner instead of
    shifting every later token, so the average rate holds.
    """

    def __init__(self, tokens_per_second: float):
        self._tokens_per_second = tokens_per_second
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()

    async def wait_for_token(self, n: int) -> None:
        if self._tokens_per_second <= 0:
            return
        delay = self._start + n / self._tokens_per_second - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


def compose_reply(messages: Sequence[ChatMessage], min_tokens: int) -> str:
    """The demo's reply to a conversation: what the user said, then padding up to min_tokens words."""
    sentences = [INTRODUCTION, *describe_conversation(messages)]
    words = sum(len(sentence.split()) for sentence in sentences)
    padding = 0
    while words < min_tokens:
        sentence = PADDING_SENTENCES[padding % len(PADDING_SENTENCES)]
        sentences.append(sentence)
        words += len(sentence.split())
        padding += 1
    return " ".join(sentences)


def describe_conversation(messages: Sequence[ChatMessage]) -> list[str]:
    user_messages = [message.content for message in messages if message.role == Role.USER]
    if not user_messages:
        return ["You have not written anything yet."]
    sentences = [f'You wrote: "{quote(user_messages[-1])}".']
    if len(user_messages) == 1:
        sentences.append("That is the first message you have sent in this conversation.")
    else:
        sentences.append(f"You have sent {len(user_messages)} messages in this conversation.")
        sentences.append(f'Your first one was: "{quote(user_messages[0])}".')
    if any(message.role == Role.SYSTEM for message in messages):
        sentences.append("I was also given instructions, which a demo model cannot follow.")
    return sentences


def quote(text: str) -> str:
    """The text on one line, cut at a word boundary to QUOTE_MAX_CHARS with "..." when longer."""
    line = " ".join(text.split())
    if len(line) <= QUOTE_MAX_CHARS:
        return line
    cut = line[:QUOTE_MAX_CHARS]
    # Prefer ending on a whole word; one enormous word is simply cut.
    if " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut + "..."


def split_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def cap_tokens(tokens: list[str], max_tokens: int) -> tuple[list[str], FinishReason]:
    if 0 < max_tokens < len(tokens):
        return tokens[:max_tokens], FinishReason.LENGTH
    return tokens, FinishReason.STOP


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """A word count: no offline tokenizer exists here, and the demo only needs a plausible number."""
    return sum(len(message.content.split()) for message in messages)
