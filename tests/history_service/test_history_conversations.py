"""Conversations through the real server: ownership, validation, paging, delete."""

import asyncio
import base64
import time
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from sqlalchemy import func, select, update

from duplex.history.v1 import history_pb2
from history_service.models import ConversationRow, MessageRow

ALICE = "alice"
BOB = "bob"
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def list_all(stub, user_id: str, page_size: int) -> list[list[history_pb2.Conversation]]:
    """Every page of the user's conversations, following next_page_token to the end."""
    pages, token = [], ""
    while True:
        request = history_pb2.ListConversationsRequest(user_id=user_id, page_size=page_size, page_token=token)
        response = await stub.ListConversations(request)
        pages.append(list(response.conversations))
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


def newest_first_key(conversation: history_pb2.Conversation) -> tuple[int, int, str]:
    return (conversation.updated_at.seconds, conversation.updated_at.nanos, conversation.conversation_id)


async def test_create_then_get_returns_the_same_conversation(stub, create_conversation):
    before = time.time()
    created = await create_conversation(ALICE, "  Trip to Lisbon \n")

    fetched = (
        await stub.GetConversation(
            history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=created.conversation_id)
        )
    ).conversation

    assert fetched == created
    assert uuid.UUID(created.conversation_id)
    assert created.user_id == ALICE
    assert created.title == "Trip to Lisbon"
    assert created.message_count == 0
    assert created.created_at == created.updated_at
    assert before - 1 <= created.created_at.ToDatetime(tzinfo=UTC).timestamp() <= time.time() + 1


@pytest.mark.parametrize("title", ["", "   ", "\t\n"])
async def test_blank_title_gets_the_default(create_conversation, title):
    assert (await create_conversation(ALICE, title)).title == "New conversation"


async def test_title_limit_is_200_characters_after_trimming(create_conversation, status_of):
    assert (await create_conversation(ALICE, "  " + "t" * 200 + "  ")).title == "t" * 200
    assert await status_of(create_conversation(ALICE, "t" * 201)) == INVALID


async def test_get_accepts_a_non_canonical_spelling_of_the_id(stub, create_conversation):
    created = await create_conversation()
    request = history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=created.conversation_id.upper())
    assert (await stub.GetConversation(request)).conversation == created


def every_rpc_without_user(stub, conversation_id: str):
    return [
        stub.CreateConversation(history_pb2.CreateConversationRequest(title="x")),
        stub.GetConversation(history_pb2.GetConversationRequest(conversation_id=conversation_id)),
        stub.ListConversations(history_pb2.ListConversationsRequest()),
        stub.DeleteConversation(history_pb2.DeleteConversationRequest(conversation_id=conversation_id)),
        stub.AppendMessage(
            history_pb2.AppendMessageRequest(conversation_id=conversation_id, role=history_pb2.ROLE_USER, content="hi")
        ),
        stub.ListMessages(history_pb2.ListMessagesRequest(conversation_id=conversation_id)),
    ]


async def test_every_rpc_requires_a_user_id(stub, create_conversation, status_of):
    conversation = await create_conversation()
    calls = every_rpc_without_user(stub, conversation.conversation_id)
    assert [await status_of(call) for call in calls] == [INVALID] * 6


async def test_user_id_longer_than_255_characters_is_invalid(create_conversation, status_of):
    assert await status_of(create_conversation("u" * 256)) == INVALID


async def test_another_users_conversation_is_not_found_everywhere(stub, create_conversation, append_message, status_of):
    conversation_id = (await create_conversation(ALICE)).conversation_id
    await append_message(conversation_id, "secret")

    assert (
        await status_of(
            stub.GetConversation(history_pb2.GetConversationRequest(user_id=BOB, conversation_id=conversation_id))
        )
        == NOT_FOUND
    )
    assert (
        await status_of(
            stub.DeleteConversation(history_pb2.DeleteConversationRequest(user_id=BOB, conversation_id=conversation_id))
        )
        == NOT_FOUND
    )
    assert await status_of(append_message(conversation_id, "intrusion", user_id=BOB)) == NOT_FOUND
    assert (
        await status_of(
            stub.ListMessages(history_pb2.ListMessagesRequest(user_id=BOB, conversation_id=conversation_id))
        )
        == NOT_FOUND
    )
    assert await list_all(stub, BOB, 10) == [[]]

    # Bob's attempts changed nothing for Alice.
    owned = await stub.GetConversation(
        history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=conversation_id)
    )
    assert owned.conversation.message_count == 1


@pytest.mark.parametrize(
    "conversation_id",
    ["", "nope", "'; DROP TABLE conversations; --", "x" * 5000, "\u00e9\u0000\ufffd", str(uuid.uuid4())],
)
async def test_malformed_or_unknown_ids_are_not_found(stub, append_message, status_of, conversation_id):
    calls = [
        stub.GetConversation(history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=conversation_id)),
        stub.DeleteConversation(history_pb2.DeleteConversationRequest(user_id=ALICE, conversation_id=conversation_id)),
        append_message(conversation_id),
        stub.ListMessages(history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id)),
    ]
    assert [await status_of(call) for call in calls] == [NOT_FOUND] * 4


async def test_list_pages_newest_first_without_gaps_or_duplicates(stub, create_conversation):
    created = [await create_conversation(ALICE, f"c{index}") for index in range(7)]
    await create_conversation(BOB, "not alice's")

    pages = await list_all(stub, ALICE, page_size=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [conversation for page in pages for conversation in page]
    assert sorted(c.conversation_id for c in listed) == sorted(c.conversation_id for c in created)
    assert listed == sorted(listed, key=newest_first_key, reverse=True)
    assert listed[0].title == "c6"
    assert listed[-1].title == "c0"


async def test_appending_a_message_moves_a_conversation_to_the_top(stub, create_conversation, append_message):
    oldest = await create_conversation(ALICE, "oldest")
    await create_conversation(ALICE, "newer")

    await append_message(oldest.conversation_id)

    [first_page] = await list_all(stub, ALICE, page_size=10)
    assert [c.title for c in first_page] == ["oldest", "newer"]
    assert first_page[0].message_count == 1


async def test_paging_is_stable_when_timestamps_are_equal(stub, create_conversation, database):
    created = [await create_conversation(ALICE, f"c{index}") for index in range(7)]
    same_moment = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    async with database.begin() as connection:
        await connection.execute(update(ConversationRow).values(updated_at=same_moment))

    pages = await list_all(stub, ALICE, page_size=2)

    assert [len(page) for page in pages] == [2, 2, 2, 1]
    listed_ids = [c.conversation_id for page in pages for c in page]
    assert listed_ids == sorted((c.conversation_id for c in created), reverse=True)


async def test_page_size_zero_means_50_and_oversized_pages_are_clamped(stub, create_conversation):
    await asyncio.gather(*(create_conversation(ALICE, f"c{index}") for index in range(51)))

    default_page = await stub.ListConversations(history_pb2.ListConversationsRequest(user_id=ALICE))
    huge_page = await stub.ListConversations(
        history_pb2.ListConversationsRequest(user_id=ALICE, page_size=4_000_000_000)
    )

    assert len(default_page.conversations) == 50
    assert default_page.next_page_token
    assert len(huge_page.conversations) == 51
    assert huge_page.next_page_token == ""


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


GARBAGE_PAGE_TOKENS = [
    "garbage",
    "!!!",
    "\u00e9t\u00e9",
    b64("{}"),
    b64('["m",3]'),  # a ListMessages token
    b64('["c","not a date","9d5e1a3c-4d5b-4c1e-9a0c-1f2e3d4c5b6a"]'),
    b64('["c","2030-01-01T00:00:00","9d5e1a3c-4d5b-4c1e-9a0c-1f2e3d4c5b6a"]'),  # no zone
    b64('["c","2030-01-01T00:00:00+00:00","not-a-uuid"]'),
    b64('["c",1,2]'),
]


async def test_garbage_page_tokens_are_invalid(stub, status_of):
    # One test over all tokens (not one per token): it runs once per backend, and starting servers costs.
    statuses = {
        token: await status_of(
            stub.ListConversations(history_pb2.ListConversationsRequest(user_id=ALICE, page_token=token))
        )
        for token in GARBAGE_PAGE_TOKENS
    }
    assert statuses == dict.fromkeys(GARBAGE_PAGE_TOKENS, INVALID)


async def test_delete_removes_the_conversation_and_its_messages(
    stub, create_conversation, append_message, status_of, database
):
    doomed = (await create_conversation(ALICE, "doomed")).conversation_id
    kept = (await create_conversation(ALICE, "kept")).conversation_id
    for conversation_id in (doomed, doomed, kept):
        await append_message(conversation_id)

    delete = history_pb2.DeleteConversationRequest(user_id=ALICE, conversation_id=doomed)
    await stub.DeleteConversation(delete)

    assert (
        await status_of(stub.GetConversation(history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=doomed)))
        == NOT_FOUND
    )
    assert (
        await status_of(stub.ListMessages(history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=doomed)))
        == NOT_FOUND
    )
    assert await status_of(stub.DeleteConversation(delete)) == NOT_FOUND
    assert [c.conversation_id for c in (await list_all(stub, ALICE, 10))[0]] == [kept]
    async with database.connect() as connection:
        rows = await connection.execute(
            select(MessageRow.conversation_id, func.count()).group_by(MessageRow.conversation_id)
        )
        assert dict(rows.all()) == {kept: 1}
