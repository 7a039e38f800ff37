"""The demo model on its own, without gRPC: what it says and how it splits its reply."""

from llm_service.providers import (
    ChatMessage,
    Chunk,
    Finished,
    GenerationRequest,
    LocalProvider,
    Role,
    Started,
)
from llm_service.providers.local import QUOTE_MAX_CHARS, compose_reply, quote, split_tokens


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
