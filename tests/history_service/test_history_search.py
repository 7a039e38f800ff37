"""SearchMessages on both backends: ranking, isolation between users, paging, and hostile queries."""

import base64
import json

import grpc
import pytest

from duplex.history.v1 import history_pb2
from history_service.search import parse_search_query, to_fts5

ALICE = "alice"
BOB = "bob"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK


async def search(stub, query: str, user_id: str = ALICE, **fields) -> history_pb2.SearchMessagesResponse:
    return await stub.SearchMessages(history_pb2.SearchMessagesRequest(user_id=user_id, query=query, **fields))


def token_with_offset(token: str, offset: int) -> str:
    """A forged page token: a real one with its offset replaced (tokens are base64 JSON arrays)."""
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    payload[1] = offset
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


async def contents(stub, query: str, user_id: str = ALICE) -> list[str]:
    return [hit.message.content for hit in (await search(stub, query, user_id)).hits]


@pytest.fixture
async def alice_conversation(create_conversation) -> str:
    return (await create_conversation(ALICE, "Pets")).conversation_id


async def test_hits_carry_the_message_its_conversation_title_and_a_marked_snippet(
    stub, alice_conversation, append_message
):
    stored = (await append_message(alice_conversation, "My parrot talks all day long")).message

    [hit] = (await search(stub, "parrot")).hits

    assert hit.message == stored
    assert hit.conversation_title == "Pets"
    assert "**parrot**" in hit.snippet


async def test_words_are_found_case_insensitively_and_all_must_appear(stub, alice_conversation, append_message):
    await append_message(alice_conversation, "The Quick brown fox")
    await append_message(alice_conversation, "A quick reply", role=history_pb2.ROLE_ASSISTANT)

    assert sorted(await contents(stub, "QUICK")) == ["A quick reply", "The Quick brown fox"]
    assert await contents(stub, "quick fox") == ["The Quick brown fox"]
    assert await contents(stub, "quick zebra") == []


async def test_better_matches_rank_first(stub, alice_conversation, append_message):
    diluted = "python " + " ".join(f"filler{index}" for index in range(40))
    await append_message(alice_conversation, diluted)
    await append_message(alice_conversation, "python python python")
    await append_message(alice_conversation, "nothing relevant here")

    assert await contents(stub, "python") == ["python python python", diluted]


async def test_phrases_or_and_exclusions(stub, alice_conversation, append_message):
    for text in ("green tea is calming", "tea green leaves", "black coffee", "green coffee beans"):
        await append_message(alice_conversation, text)

    assert await contents(stub, '"green tea"') == ["green tea is calming"]
    assert sorted(await contents(stub, "tea or black")) == ["black coffee", "green tea is calming", "tea green leaves"]
    assert sorted(await contents(stub, "green -coffee")) == ["green tea is calming", "tea green leaves"]


async def test_other_users_messages_are_never_returned(stub, create_conversation, append_message):
    alices = (await create_conversation(ALICE, "mine")).conversation_id
    bobs = (await create_conversation(BOB, "secret plans")).conversation_id
    await append_message(alices, "meeting at noon")
    await append_message(bobs, "meeting at midnight, secret", user_id=BOB)

    assert await contents(stub, "meeting") == ["meeting at noon"]
    assert await contents(stub, "secret OR midnight") == []
    assert await contents(stub, "meeting", user_id=BOB) == ["meeting at midnight, secret"]


async def test_system_and_tool_messages_are_not_searched(stub, alice_conversation, append_message):
    await append_message(alice_conversation, "You are a banana expert", role=history_pb2.ROLE_SYSTEM)
    await append_message(alice_conversation, '{"banana": 3}', role=history_pb2.ROLE_TOOL, tool_call_id="call-1")
    await append_message(alice_conversation, "how many banana?")

    assert await contents(stub, "banana") == ["how many banana?"]


async def test_deleted_conversations_leave_nothing_searchable(stub, alice_conversation, append_message):
    await append_message(alice_conversation, "ephemeral thought")
    delete = history_pb2.DeleteConversationRequest(user_id=ALICE, conversation_id=alice_conversation)
    await stub.DeleteConversation(delete)

    assert await contents(stub, "ephemeral") == []


async def test_pages_cover_every_hit_once(stub, alice_conversation, append_message):
    for index in range(7):
        await append_message(alice_conversation, f"needle number {index}")

    seen, token = [], ""
    while True:
        page = await search(stub, "needle", page_size=3, page_token=token)
        seen.append(len(page.hits))
        seen_contents = [hit.message.content for hit in page.hits]
        assert all("needle" in text for text in seen_contents)
        token = page.next_page_token
        if not token:
            break

    assert seen == [3, 3, 1]


async def test_a_page_token_only_continues_its_own_query(stub, alice_conversation, append_message, status_of):
    for index in range(3):
        await append_message(alice_conversation, f"alpha beta {index}")
    token = (await search(stub, "alpha", page_size=1)).next_page_token

    assert await status_of(search(stub, "beta", page_size=1, page_token=token)) == INVALID
    assert await status_of(search(stub, "alpha", page_token="garbage")) == INVALID
    # The token's own shape, with an offset past any BIGINT.
    too_far = token_with_offset(token, 2**63)
    assert await status_of(search(stub, "alpha", page_size=1, page_token=too_far)) == INVALID


HOSTILE_QUERIES = [
    '"',
    '""',
    "AND OR (",
    "NOT",
    "*",
    "python*",
    "^python",
    "content:python",
    "NEAR(python snake)",
    'python" OR "',
    "'; DROP TABLE messages; --",
    "-python",
    "( ) : ^ * \\",
    "or",
    "python & !snake | (",
    "\u00e9t\u00e9 \u6f22\u5b57 \U0001f600",
    "a" * 500,
]


async def test_hostile_queries_give_invalid_argument_or_results_never_internal(
    stub, alice_conversation, append_message, status_of
):
    await append_message(alice_conversation, "python and snake, t\u00e9t\u00e9 \u6f22\u5b57")

    statuses = {query: await status_of(search(stub, query)) for query in HOSTILE_QUERIES}

    assert {query: status for query, status in statuses.items() if status not in (OK, INVALID)} == {}


WORDLESS_OR_OVERLONG_QUERIES = ["", "   ", '"', "-python", "!!!", "or", "x" * 501, "nul\x00byte"]


async def test_empty_overlong_or_wordless_queries_are_invalid(stub, status_of):
    statuses = {query: await status_of(search(stub, query)) for query in WORDLESS_OR_OVERLONG_QUERIES}
    assert statuses == dict.fromkeys(WORDLESS_OR_OVERLONG_QUERIES, INVALID)


async def test_fts5_keywords_are_plain_words(stub, alice_conversation, append_message):
    await append_message(alice_conversation, "NEAR the AND gate")
    assert await contents(stub, "near AND") == ["NEAR the AND gate"]


async def test_search_requires_a_user(stub, status_of):
    assert await status_of(stub.SearchMessages(history_pb2.SearchMessagesRequest(query="x"))) == INVALID


def test_fts5_queries_only_hold_quoted_words_and_our_operators():
    query = parse_search_query('cats "big dogs" -mice or NEAR(bird) AND "unclosed')
    # Words joined by punctuation (NEAR(bird), e-mail) stay together as a phrase.
    assert to_fts5(query) == '("cats" AND "big dogs" NOT "mice") OR ("NEAR bird" AND "AND" AND "unclosed")'


@pytest.mark.parametrize("text", ["", "  ", '"', "-alone", "OR or", "!!! ???"])
def test_queries_without_a_positive_word_parse_to_none(text):
    assert parse_search_query(text) is None
