"""`local`: Duplex's built-in demo model. Deterministic, offline, and NOT a language model.

It answers from a template filled in from the conversation (the latest user message, how many messages
the user has sent, the first one), so a client can see that context travels end to end, and the same
conversation always gets the same reply, byte for byte, which makes it usable in tests.

So that the gateway's tool loop runs offline too, it calls the tools it is offered when the latest user
message obviously wants one (the time, arithmetic, a history search), and reads their results back. A
system prompt starting with "Summarize" gets a short summary of the conversation instead. Its embeddings
are hashed bags of words: deterministic and offline, good enough to find the same words again, and no
substitute for a real embedding model.
"""

import asyncio
import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from llm_service.providers.base import (
    ChatMessage,
    Chunk,
    EmbeddingRequest,
    Embeddings,
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
_WORD = re.compile(r"\w+")

# What a user message must say for the demo to call each tool, tried in this order.
_HISTORY_SEARCHES = (
    re.compile(
        r"\bsearch\s+(?:through\s+)?(?:my|our|the)?\s*(?:chat\s+|conversation\s+)?"
        r"(?:history|conversations|chats|messages)\s+for\s+(?P<query>.+)",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(
        r"\bfind\s+(?P<query>.+?)\s+in\s+(?:my|our|the)\s+(?:chat\s+|conversation\s+)?"
        r"(?:history|conversations|chats|messages)\b",
        re.IGNORECASE | re.DOTALL,
    ),
)
# A run of numbers, operators and parentheses, e.g. "12*(3+4)" or "2^10"; it must hold an operation.
_EXPRESSION = re.compile(r"-?[\d(][\d\s.+\-*/^%()]*")
_OPERATION = re.compile(r"[\d)]\s*[-+*/^%]\s*[(\-]*\d")
_TIME = re.compile(r"\btime\b", re.IGNORECASE)
# Stripped from around a search query: straight and typographic quotes.
QUOTES = "\"'\u201c\u201d\u2018\u2019"
SUMMARY_PROMPT_PREFIX = "summarize"
EMBEDDING_DIMENSIONS = 64


class LocalProvider:
    """Serves `local-demo`. `active_generations` counts replies still streaming (cancelled ones stop)."""

    name = PROVIDER_NAME

    def __init__(self, *, tokens_per_second: float, min_reply_tokens: int, tokens_per_chunk: int = 1):
        self._tokens_per_second = tokens_per_second
        self._min_reply_tokens = min_reply_tokens
        self._tokens_per_chunk = tokens_per_chunk
        self.active_generations = 0

    def models(self) -> list[ModelDescription]:
        return [
            ModelDescription(
                name=MODEL_NAME,
                provider=PROVIDER_NAME,
                description=MODEL_DESCRIPTION,
                supports_tools=True,
                supports_embeddings=True,
            )
        ]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        text, tool_calls = plan_reply(request.messages, request.tools, self._min_reply_tokens)
        reply, finish_reason = cap_tokens(split_tokens(text), request.max_tokens)
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
            for call in tool_calls:
                yield ToolCallItem(call)
                sent += len(split_tokens(call.name + " " + call.arguments_json))
            if tool_calls:
                finish_reason = FinishReason.TOOL_CALLS
            yield Finished(finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=sent)
        finally:
            self.active_generations -= 1

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        return Embeddings(
            vectors=tuple(embed_text(text) for text in request.inputs),
            prompt_tokens=sum(len(_WORD.findall(text)) for text in request.inputs),
        )

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


def plan_reply(
    messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition], min_tokens: int
) -> tuple[str, tuple[ToolCall, ...]]:
    """The demo's whole answer: its text, and the tools it calls (then the text is empty)."""
    if is_summary_request(messages):
        return summarize(messages), ()
    results = trailing_tool_results(messages)
    if results:
        return pad(describe_tool_results(messages, results), min_tokens), ()
    call = choose_tool_call(messages, tools)
    if call is not None:
        return "", (call,)
    return compose_reply(messages, min_tokens), ()


def compose_reply(messages: Sequence[ChatMessage], min_tokens: int) -> str:
    """The demo's reply to a conversation: what the user said, then padding up to min_tokens words."""
    return pad([INTRODUCTION, *describe_conversation(messages)], min_tokens)


def pad(sentences: list[str], min_tokens: int) -> str:
    """The sentences, then padding sentences until there are at least min_tokens words."""
    sentences = list(sentences)
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


# --- tools ---------------------------------------------------------------------------------------------


def choose_tool_call(messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]) -> ToolCall | None:
    """The tool call the latest user message obviously asks for, among the tools offered; None if none."""
    offered = {tool.name for tool in tools}
    latest = next((message.content for message in reversed(messages) if message.role == Role.USER), "")
    if not offered or not latest:
        return None
    wanted: tuple[str, dict[str, str]] | None = None
    if "search_history" in offered and (query := history_query(latest)):
        wanted = ("search_history", {"query": query})
    elif "calculator" in offered and (expression := arithmetic_expression(latest)):
        wanted = ("calculator", {"expression": expression})
    elif "current_time" in offered and _TIME.search(latest):
        wanted = ("current_time", {})
    if wanted is None:
        return None
    name, arguments = wanted
    return ToolCall(id=tool_call_id(messages, name), name=name, arguments_json=json.dumps(arguments))


def history_query(text: str) -> str:
    for pattern in _HISTORY_SEARCHES:
        if match := pattern.search(text):
            return match.group("query").strip().rstrip(".?!").strip().strip(QUOTES).strip()
    return ""


def arithmetic_expression(text: str) -> str:
    """The first arithmetic expression in the text ("what is 12*(3+4)?" -> "12*(3+4)"), or ""."""
    for match in _EXPRESSION.finditer(text):
        candidate = match.group().strip().rstrip(".+-*/^% ")
        # A closing parenthesis of the sentence, not of the expression.
        while candidate.endswith(")") and candidate.count(")") > candidate.count("("):
            candidate = candidate[:-1].rstrip()
        if _OPERATION.search(candidate):
            return candidate
    return ""


def tool_call_id(messages: Sequence[ChatMessage], name: str) -> str:
    """Deterministic, and different for every conversation that reaches this point."""
    digest = hashlib.blake2b(digest_size=6)
    for message in messages:
        digest.update(f"{message.role}\x00{message.content}\x00".encode())
    digest.update(name.encode())
    return f"call_{digest.hexdigest()}"


def trailing_tool_results(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The tool results the conversation ends with, in order (empty when it ends otherwise)."""
    results: list[ChatMessage] = []
    for message in reversed(messages):
        if message.role != Role.TOOL:
            break
        results.append(message)
    return results[::-1]


def describe_tool_results(messages: Sequence[ChatMessage], results: Sequence[ChatMessage]) -> list[str]:
    calls = {call.id: call for message in messages for call in message.tool_calls}
    return [describe_tool_result(result, calls.get(result.tool_call_id)) for result in results]


def describe_tool_result(result: ChatMessage, call: ToolCall | None) -> str:
    name = result.name or (call.name if call else "") or "tool"
    value = parse_json(result.content)
    fields = value if isinstance(value, dict) else {}
    arguments = parse_json(call.arguments_json) if call else {}
    arguments = arguments if isinstance(arguments, dict) else {}
    if "error" in fields:
        return f'The {name} tool failed: "{quote(str(fields["error"]))}".'
    if name == "calculator":
        expression = fields.get("expression") or arguments.get("expression") or "the expression"
        answer = fields.get("result", value)
        return f"The calculator says {quote(str(expression))} = {render(answer)}."
    if name == "current_time" and "iso" in fields:
        zone = f" ({fields['timezone']})" if fields.get("timezone") else ""
        return f"The current time is {fields['iso']}{zone}."
    if name == "search_history" and isinstance(fields.get("results"), list):
        return describe_search(str(fields.get("query") or arguments.get("query", "")), fields["results"])
    return f'The {name} tool returned: "{quote(render(value))}".'


def describe_search(query: str, hits: list[Any]) -> str:
    if not hits:
        return f'Searching your history for "{quote(query)}" found nothing.'
    count = "1 message" if len(hits) == 1 else f"{len(hits)} messages"
    first = hits[0].get("snippet") if isinstance(hits[0], dict) else None
    found = f'Searching your history for "{quote(query)}" found {count}'
    return f'{found}; the first says: "{quote(str(first))}".' if first else f"{found}."


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- summaries -----------------------------------------------------------------------------------------


def is_summary_request(messages: Sequence[ChatMessage]) -> bool:
    return any(
        message.role == Role.SYSTEM and message.content.lstrip().lower().startswith(SUMMARY_PROMPT_PREFIX)
        for message in messages
    )


def summarize(messages: Sequence[ChatMessage]) -> str:
    """How many user messages there are, and the first and the last of them; short and unpadded."""
    user_messages = [message.content for message in messages if message.role == Role.USER]
    if not user_messages:
        return "Summary: the conversation has no user messages yet."
    if len(user_messages) == 1:
        return f'Summary: 1 user message: "{quote(user_messages[0])}".'
    first, last = quote(user_messages[0]), quote(user_messages[-1])
    return f'Summary: {len(user_messages)} user messages. The first: "{first}". The last: "{last}".'


# --- embeddings ----------------------------------------------------------------------------------------


def embed_text(text: str) -> tuple[float, ...]:
    """A demo embedding: each word adds +-1 to one of 64 components chosen by its hash, then L2-normalised.

    Texts sharing words point the same way; meaning plays no part. A text without words is all zeros.
    blake2b, not hash(), so the vectors are the same in every process.
    """
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % EMBEDDING_DIMENSIONS
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(component * component for component in vector))
    return tuple(component / norm for component in vector) if norm else tuple(vector)
