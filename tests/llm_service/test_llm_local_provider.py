"""The demo model on its own, without gRPC: what it says and how it splits its reply."""

import json
import math

import pytest

from llm_service.providers import (
    ChatMessage,
    Chunk,
    EmbeddingRequest,
    Finished,
    FinishReason,
    GenerationRequest,
    LocalProvider,
    Role,
    Started,
    ToolCall,
    ToolCallItem,
    ToolDefinition,
)
from llm_service.providers.local import (
    EMBEDDING_DIMENSIONS,
    QUOTE_MAX_CHARS,
    compose_reply,
    embed_text,
    quote,
    split_tokens,
)


async def generate(*messages: ChatMessage, max_tokens: int = 0) -> list:
    provider = LocalProvider(tokens_per_second=0, min_reply_tokens=40)
    request = GenerationRequest(model="local-demo", messages=messages, max_tokens=max_tokens)
    return [item async for item in provider.generate(request)]


async def test_the_items_spell_the_composed_reply():
    messages = (ChatMessage(Role.USER, "Hi there"),)

    items = await generate(*messages)

    assert isinstance(items[0], Started)
    assert isinstance(items[-1], Finished)
    chunks = [item for item in items if isinstance(item, Chunk)]
    assert "".join(chunk.text for chunk in chunks) == compose_reply(messages, min_tokens=40)


async def test_a_conversation_without_user_messages_gets_a_reply_too():
    items = await generate(ChatMessage(Role.SYSTEM, "Be brief."))

    text = "".join(item.text for item in items if isinstance(item, Chunk))
    assert "You have not written anything yet." in text


def test_tokens_rejoin_into_the_text_exactly():
    text = "One  two\tthree\n\nfour "

    assert split_tokens(text) == ["One  ", "two\t", "three\n\n", "four "]
    assert "".join(split_tokens(text)) == text


def test_a_quote_is_one_line_and_cut_at_a_word_boundary():
    assert quote("short\nand   sweet") == "short and sweet"
    cut = quote("abcdefghi " * 20)
    assert cut.endswith("...")
    assert len(cut) <= QUOTE_MAX_CHARS + 3
    assert cut.removesuffix("...").split(" ")[-1] == "abcdefghi"
    assert quote("x" * 500) == "x" * QUOTE_MAX_CHARS + "..."


# --- tools, summaries and embeddings ------------------------------------------------------------------

OFFERED = tuple(ToolDefinition(name=name, description="") for name in ("current_time", "calculator", "search_history"))


async def items_for(*messages: ChatMessage, tools: tuple[ToolDefinition, ...] = OFFERED) -> list:
    provider = LocalProvider(tokens_per_second=0, min_reply_tokens=40)
    request = GenerationRequest(model="local-demo", messages=messages, tools=tools)
    return [item async for item in provider.generate(request)]


async def requested_call(text: str, tools: tuple[ToolDefinition, ...] = OFFERED) -> ToolCall | None:
    items = await items_for(ChatMessage(Role.USER, text), tools=tools)
    calls = [item.tool_call for item in items if isinstance(item, ToolCallItem)]
    return calls[0] if calls else None


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ("What time is it?", "current_time", {}),
        ("what is 12*(3+4)?", "calculator", {"expression": "12*(3+4)"}),
        ("calculate 2^10", "calculator", {"expression": "2^10"}),
        ("How much is (1.5 + 2) / 7, roughly?", "calculator", {"expression": "(1.5 + 2) / 7"}),
        ("Search my history for pizza recipes.", "search_history", {"query": "pizza recipes"}),
        ('search my conversations for "the Lisbon trip"?', "search_history", {"query": "the Lisbon trip"}),
        ("Find the Lisbon trip in my conversations", "search_history", {"query": "the Lisbon trip"}),
        # The search wins over "time" inside its query.
        ("search my history for time zones", "search_history", {"query": "time zones"}),
    ],
)
async def test_the_demo_calls_the_tool_a_message_asks_for(text: str, name: str, arguments: dict):
    items = await items_for(ChatMessage(Role.USER, text))

    assert [type(item) for item in items] == [Started, ToolCallItem, Finished]
    call = items[1].tool_call
    assert (call.name, json.loads(call.arguments_json)) == (name, arguments)
    assert call.id.startswith("call_")
    assert items[-1].finish_reason == FinishReason.TOOL_CALLS
    assert items[-1].completion_tokens > 0


@pytest.mark.parametrize(
    ("text", "tools"),
    [
        ("What time is it?", ()),
        ("What time is it?", (ToolDefinition(name="calculator", description=""),)),
        ("I have 3 cats and 4 dogs", OFFERED),
        ("Hello there", OFFERED),
    ],
    ids=["no tools offered", "the tool is not offered", "numbers without arithmetic", "nothing to do"],
)
async def test_the_demo_answers_in_text_when_no_offered_tool_fits(text: str, tools):
    assert await requested_call(text, tools) is None


async def test_the_same_conversation_gets_the_same_call_id_and_another_a_different_one():
    first = await requested_call("what is 1+1?")
    again = await requested_call("what is 1+1?")
    other = await requested_call("what is 2+2?")

    assert first == again
    assert first.id != other.id


def tool_round(name: str, arguments: str, result: str) -> tuple[ChatMessage, ...]:
    call = ToolCall(id="call_1", name=name, arguments_json=arguments)
    return (
        ChatMessage(Role.USER, "question"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=(call,)),
        ChatMessage(Role.TOOL, result, tool_call_id="call_1", name=name),
    )


@pytest.mark.parametrize(
    ("round_", "expected"),
    [
        (
            tool_round("calculator", '{"expression": "12*(3+4)"}', '{"expression": "12*(3+4)", "result": 84}'),
            "The calculator says 12*(3+4) = 84.",
        ),
        (tool_round("calculator", '{"expression": "2^10"}', "1024"), "The calculator says 2^10 = 1024."),
        (
            tool_round("current_time", "{}", '{"iso": "2026-11-22T10:00:00+01:00", "timezone": "Europe/Paris"}'),
            "The current time is 2026-11-22T10:00:00+01:00 (Europe/Paris).",
        ),
        (
            tool_round(
                "search_history",
                '{"query": "pizza"}',
                '{"query": "pizza", "results": [{"snippet": "the pizza place on 5th"}, {"snippet": "more pizza"}]}',
            ),
            'Searching your history for "pizza" found 2 messages; the first says: "the pizza place on 5th".',
        ),
        (
            tool_round("search_history", '{"query": "kale"}', '{"query": "kale", "results": []}'),
            'Searching your history for "kale" found nothing.',
        ),
        (
            tool_round("calculator", '{"expression": "1/0"}', '{"error": "division by zero"}'),
            'The calculator tool failed: "division by zero".',
        ),
        (tool_round("weather", '{"city": "Oslo"}', '{"celsius": -3}'), 'The weather tool returned: "{"celsius": -3}".'),
    ],
    ids=["calculator", "bare result", "current_time", "search", "search without hits", "error", "unknown tool"],
)
async def test_the_demo_states_tool_results_then_pads(round_, expected: str):
    items = await items_for(*round_)

    text = "".join(item.text for item in items if isinstance(item, Chunk))
    assert text.startswith(expected)
    assert len(text.split()) >= 40
    assert items[-1].finish_reason == FinishReason.STOP
    assert not any(isinstance(item, ToolCallItem) for item in items)


async def test_several_results_are_stated_in_order():
    calls = (
        ToolCall(id="a", name="calculator", arguments_json='{"expression": "1+1"}'),
        ToolCall(id="b", name="calculator", arguments_json='{"expression": "2+2"}'),
    )
    items = await items_for(
        ChatMessage(Role.USER, "1+1 and 2+2?"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=calls),
        ChatMessage(Role.TOOL, '{"result": 2}', tool_call_id="a", name="calculator"),
        ChatMessage(Role.TOOL, '{"result": 4}', tool_call_id="b", name="calculator"),
    )

    text = "".join(item.text for item in items if isinstance(item, Chunk))
    assert text.startswith("The calculator says 1+1 = 2. The calculator says 2+2 = 4.")


async def test_a_summarize_prompt_gets_a_short_deterministic_summary():
    messages = (
        ChatMessage(Role.SYSTEM, "Summarize the conversation in one paragraph."),
        ChatMessage(Role.USER, "Plan a trip to Lisbon"),
        ChatMessage(Role.ASSISTANT, "Sure."),
        ChatMessage(Role.USER, "What about food?"),
        ChatMessage(Role.USER, "word " * 100),
    )

    items = await items_for(*messages)
    again = await items_for(*messages)

    text = "".join(item.text for item in items if isinstance(item, Chunk))
    assert text.startswith('Summary: 3 user messages. The first: "Plan a trip to Lisbon". The last: "word word')
    assert text.endswith('...".')
    assert len(text) < 250
    assert items == again


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ((ChatMessage(Role.USER, "Hi"),), 'Summary: 1 user message: "Hi".'),
        ((), "Summary: the conversation has no user messages yet."),
    ],
)
async def test_summaries_of_short_conversations(messages, expected: str):
    items = await items_for(ChatMessage(Role.SYSTEM, "summarize this"), *messages)

    assert "".join(item.text for item in items if isinstance(item, Chunk)) == expected


async def test_local_embeddings_are_deterministic_normalised_and_64_wide():
    provider = LocalProvider(tokens_per_second=0, min_reply_tokens=40)
    texts = ("the cat sat on the mat", "The cat sat on a mat!", "quantum chromodynamics lecture", "...")

    result = await provider.embed(EmbeddingRequest(model="local-demo", inputs=texts))

    cat, similar_cat, physics, nothing = result.vectors
    assert all(len(vector) == EMBEDDING_DIMENSIONS == 64 for vector in result.vectors)
    assert math.isclose(math.hypot(*cat), 1.0) and math.isclose(math.hypot(*physics), 1.0)
    assert set(nothing) == {0.0}
    assert dot(cat, similar_cat) > 0.7 > dot(cat, physics)
    assert result.prompt_tokens == 6 + 6 + 3
    assert embed_text("the cat sat on the mat") == cat


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
