"""Messages through the real server: ordering, paging, validation, idempotent appends."""

import asyncio

import grpc
import pytest

from duplex.history.v1 import history_pb2
from history_service.servicer import page_size

ALICE = "alice"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UINT32_MAX = 2**32 - 1


async def list_all_messages(
    stub, conversation_id: str, page_size: int, *, newest_first: bool = False
) -> list[list[history_pb2.Message]]:
    pages, token = [], ""
    while True:
        request = history_pb2.ListMessagesRequest(
            user_id=ALICE,
            conversation_id=conversation_id,
            page_size=page_size,
            page_token=token,
            newest_first=newest_first,
        )
        response = await stub.ListMessages(request)
        pages.append(list(response.messages))
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


async def get_conversation(stub, conversation_id: str) -> history_pb2.Conversation:
    request = history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=conversation_id)
    return (await stub.GetConversation(request)).conversation


@pytest.fixture
async def conversation_id(create_conversation) -> str:
    return (await create_conversation(ALICE, "chat")).conversation_id


async def test_append_stores_every_field(stub, conversation_id, append_message):
    response = await append_message(
        conversation_id,
        "Hi there!",
        role=history_pb2.ROLE_ASSISTANT,
        status=history_pb2.MESSAGE_STATUS_CANCELLED,
        client_message_id="turn-1-answer",
        model="demo-model",
        prompt_tokens=UINT32_MAX,
        completion_tokens=7,
    )

    stored = response.message
    assert not response.duplicate
    assert stored.message_id and stored.message_id != conversation_id
    assert (stored.conversation_id, stored.role, stored.content) == (
        conversation_id,
        history_pb2.ROLE_ASSISTANT,
        "Hi there!",
    )
    assert stored.status == history_pb2.MESSAGE_STATUS_CANCELLED
    assert (stored.client_message_id, stored.model) == ("turn-1-answer", "demo-model")
    assert (stored.prompt_tokens, stored.completion_tokens) == (UINT32_MAX, 7)
    assert stored.created_at.seconds > 0
    [[listed]] = await list_all_messages(stub, conversation_id, 10)
    assert listed == stored


async def test_unspecified_status_is_stored_as_complete(conversation_id, append_message):
    response = await append_message(conversation_id, status=history_pb2.MESSAGE_STATUS_UNSPECIFIED)
    assert response.message.status == history_pb2.MESSAGE_STATUS_COMPLETE


async def test_append_bumps_updated_at_and_message_count(stub, conversation_id, append_message):
    before = await get_conversation(stub, conversation_id)

    first = (await append_message(conversation_id, "one")).message
    await append_message(conversation_id, "two")

    after = await get_conversation(stub, conversation_id)
    assert after.message_count == 2
    assert after.created_at == before.created_at
    assert after.updated_at.ToDatetime() >= first.created_at.ToDatetime() > before.updated_at.ToDatetime()


async def test_append_returns_the_conversation_message_count(stub, conversation_id, append_message):
    counts = [(await append_message(conversation_id, f"m{n}")).conversation_message_count for n in range(3)]

    assert counts == [1, 2, 3]
    assert (await get_conversation(stub, conversation_id)).message_count == 3


async def test_a_duplicate_returns_the_current_message_count(conversation_id, append_message):
    await append_message(conversation_id, "first", client_message_id="client-1")
    await append_message(conversation_id, "second")

    retry = await append_message(conversation_id, "first again", client_message_id="client-1")

    assert retry.duplicate
    assert retry.conversation_message_count == 2


async def test_concurrent_appends_return_distinct_message_counts(conversation_id, append_message):
    # Each count is the one right after its own append, so a client can tell whether anyone else wrote.
    responses = await asyncio.gather(*(append_message(conversation_id, f"m{n}") for n in range(8)))

    assert sorted(response.conversation_message_count for response in responses) == list(range(1, 9))


async def test_messages_are_listed_oldest_first_across_pages(stub, conversation_id, append_message):
    roles = [history_pb2.ROLE_SYSTEM, history_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT]
    for index in range(7):
        await append_message(conversation_id, f"m{index}", role=roles[index % 3])

    pages = await list_all_messages(stub, conversation_id, page_size=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [message for page in pages for message in page]
    assert [m.content for m in listed] == [f"m{index}" for index in range(7)]
    assert [m.role for m in listed] == [roles[index % 3] for index in range(7)]
    assert len({m.message_id for m in listed}) == 7


async def test_an_empty_conversation_lists_no_messages(stub, conversation_id):
    assert await list_all_messages(stub, conversation_id, page_size=0) == [[]]
    assert await list_all_messages(stub, conversation_id, page_size=0, newest_first=True) == [[]]


async def test_newest_first_pages_run_from_the_newest_message_back(stub, conversation_id, append_message):
    for index in range(7):
        await append_message(conversation_id, f"m{index}")

    pages = await list_all_messages(stub, conversation_id, page_size=3, newest_first=True)

    assert [[m.content for m in page] for page in pages] == [["m6", "m5", "m4"], ["m3", "m2", "m1"], ["m0"]]
    oldest_first = await list_all_messages(stub, conversation_id, page_size=10)
    assert [m for page in pages for m in page] == list(reversed(oldest_first[0]))


async def test_newest_first_reads_the_context_window_in_one_call(stub, conversation_id, append_message):
    for index in range(5):
        await append_message(conversation_id, f"m{index}")

    request = history_pb2.ListMessagesRequest(
        user_id=ALICE, conversation_id=conversation_id, page_size=5, newest_first=True
    )
    response = await stub.ListMessages(request)

    assert [m.content for m in response.messages] == ["m4", "m3", "m2", "m1", "m0"]
    assert response.next_page_token == ""


async def test_newest_first_paging_continues_past_messages_appended_meanwhile(stub, conversation_id, append_message):
    for index in range(4):
        await append_message(conversation_id, f"m{index}")
    request = history_pb2.ListMessagesRequest(
        user_id=ALICE, conversation_id=conversation_id, page_size=2, newest_first=True
    )
    first = await stub.ListMessages(request)

    await append_message(conversation_id, "later")
    request.page_token = first.next_page_token
    second = await stub.ListMessages(request)

    assert [m.content for m in first.messages] == ["m3", "m2"]
    assert [m.content for m in second.messages] == ["m1", "m0"]
    assert second.next_page_token == ""


async def test_a_page_token_only_works_in_its_own_direction(stub, conversation_id, append_message, status_of):
    for index in range(3):
        await append_message(conversation_id, f"m{index}")

    def list_messages(newest_first: bool, token: str = ""):
        request = history_pb2.ListMessagesRequest(
            user_id=ALICE, conversation_id=conversation_id, page_size=1, page_token=token, newest_first=newest_first
        )
        return stub.ListMessages(request)

    oldest_token = (await list_messages(False)).next_page_token
    newest_token = (await list_messages(True)).next_page_token
    assert await status_of(list_messages(True, oldest_token)) == INVALID
    assert await status_of(list_messages(False, newest_token)) == INVALID


async def test_newest_first_hides_other_users_conversations(stub, conversation_id, append_message, status_of):
    await append_message(conversation_id, "secret")
    request = history_pb2.ListMessagesRequest(user_id="bob", conversation_id=conversation_id, newest_first=True)
    assert await status_of(stub.ListMessages(request)) == grpc.StatusCode.NOT_FOUND


async def test_message_page_size_zero_means_100(stub, conversation_id, append_message):
    for index in range(101):
        await append_message(conversation_id, f"m{index}")

    first = await stub.ListMessages(history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id))
    everything = await stub.ListMessages(
        history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id, page_size=UINT32_MAX)
    )

    assert len(first.messages) == 100
    assert first.next_page_token
    assert len(everything.messages) == 101
    assert everything.next_page_token == ""


def test_page_sizes_default_when_zero_and_clamp_when_too_large():
    assert page_size(0, 100, 1000) == 100
    assert page_size(7, 100, 1000) == 7
    assert page_size(1000, 100, 1000) == 1000
    assert page_size(1001, 100, 1000) == 1000


# bQ is "m"; the others are ["m",-1], ["m",true], ["m","3"] and ["m",2**63] (past any BIGINT).
GARBAGE_MESSAGE_PAGE_TOKENS = [
    "garbage",
    "bQ",
    "WyJtIiwtMV0",
    "WyJtIix0cnVlXQ",
    "WyJtIiwiMyJd",
    "WyJtIiw5MjIzMzcyMDM2ODU0Nzc1ODA4XQ",
]


async def test_garbage_message_page_tokens_are_invalid(stub, conversation_id, status_of):
    def list_messages(token: str):
        request = history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id, page_token=token)
        return stub.ListMessages(request)

    statuses = {token: await status_of(list_messages(token)) for token in GARBAGE_MESSAGE_PAGE_TOKENS}
    assert statuses == dict.fromkeys(GARBAGE_MESSAGE_PAGE_TOKENS, INVALID)


async def test_newest_first_cursors_past_any_bigint_are_invalid(stub, conversation_id, status_of):
    # ["mn",2**63]: the largest cursor a BIGINT pk could need is 2**63-1.
    token = "WyJtbiIsOTIyMzM3MjAzNjg1NDc3NTgwOF0"
    request = history_pb2.ListMessagesRequest(
        user_id=ALICE, conversation_id=conversation_id, page_token=token, newest_first=True
    )
    assert await status_of(stub.ListMessages(request)) == INVALID


async def test_a_conversation_page_token_is_invalid_for_messages(stub, create_conversation, conversation_id, status_of):
    await create_conversation(ALICE, "another")
    conversations = await stub.ListConversations(history_pb2.ListConversationsRequest(user_id=ALICE, page_size=1))
    request = history_pb2.ListMessagesRequest(
        user_id=ALICE, conversation_id=conversation_id, page_token=conversations.next_page_token
    )
    assert await status_of(stub.ListMessages(request)) == INVALID


@pytest.mark.parametrize("role", [history_pb2.ROLE_UNSPECIFIED, 99])
async def test_role_must_be_user_assistant_or_system(conversation_id, append_message, status_of, role):
    assert await status_of(append_message(conversation_id, role=role)) == INVALID


async def test_unknown_status_is_invalid(conversation_id, append_message, status_of):
    assert await status_of(append_message(conversation_id, status=42)) == INVALID


async def test_content_limit_is_100000_characters(stub, conversation_id, append_message, status_of):
    assert (await append_message(conversation_id, "\u00e9" * 100_000)).message.content == "\u00e9" * 100_000
    assert await status_of(append_message(conversation_id, "x" * 100_001)) == INVALID
    assert (await get_conversation(stub, conversation_id)).message_count == 1


async def test_overlong_client_message_id_is_invalid(conversation_id, append_message, status_of):
    assert await status_of(append_message(conversation_id, client_message_id="k" * 256)) == INVALID


async def test_repeating_a_client_message_id_returns_the_original(stub, conversation_id, append_message):
    original = await append_message(conversation_id, "first try", client_message_id="client-1")

    retry = await append_message(
        conversation_id, "second try", role=history_pb2.ROLE_ASSISTANT, client_message_id="client-1"
    )

    assert not original.duplicate
    assert retry.duplicate
    assert retry.message == original.message
    assert [[m.content for m in page] for page in await list_all_messages(stub, conversation_id, 10)] == [["first try"]]
    assert (await get_conversation(stub, conversation_id)).message_count == 1


async def test_concurrent_appends_of_one_client_message_id_store_one_message(stub, conversation_id, append_message):
    responses = await asyncio.gather(
        *(append_message(conversation_id, f"attempt {n}", client_message_id="same-key") for n in range(3))
    )

    assert sorted(response.duplicate for response in responses) == [False, True, True]
    assert len({response.message.message_id for response in responses}) == 1
    assert len({response.message.content for response in responses}) == 1
    assert [response.conversation_message_count for response in responses] == [1, 1, 1]
    [[stored]] = await list_all_messages(stub, conversation_id, 10)
    assert stored.message_id == responses[0].message.message_id
    assert (await get_conversation(stub, conversation_id)).message_count == 1


async def test_client_message_ids_are_scoped_to_their_conversation(create_conversation, append_message):
    first = (await create_conversation(ALICE, "one")).conversation_id
    second = (await create_conversation(ALICE, "two")).conversation_id

    in_first = await append_message(first, client_message_id="shared")
    in_second = await append_message(second, client_message_id="shared")

    assert not in_second.duplicate
    assert in_second.message.message_id != in_first.message.message_id


async def test_an_empty_client_message_id_never_deduplicates(stub, conversation_id, append_message):
    responses = [await append_message(conversation_id, "same", client_message_id="") for _ in range(3)]

    assert not any(response.duplicate for response in responses)
    assert len({response.message.message_id for response in responses}) == 3
    assert (await get_conversation(stub, conversation_id)).message_count == 3


async def test_many_concurrent_writers_all_succeed(create_conversation, append_message, stub):
    # The load of many answers finishing at once (SQLite used to fail with "database is locked").
    conversations = [(await create_conversation(ALICE, f"c{n}")).conversation_id for n in range(20)]
    appends = [
        append_message(conversation_id, f"answer {n}", role=history_pb2.ROLE_ASSISTANT, model="m",
                       prompt_tokens=10, completion_tokens=40, client_message_id=f"turn:{n}")
        for n in range(10)
        for conversation_id in conversations
    ]
    readers = [
        stub.ListMessages(history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id))
        for conversation_id in conversations
        for _ in range(5)
    ]
    renames = [
        stub.RenameConversation(history_pb2.RenameConversationRequest(
            user_id=ALICE, conversation_id=conversation_id, title="renamed"))
        for conversation_id in conversations
    ]
    results = await asyncio.gather(*appends, *readers, *renames)
    responses = results[: len(appends)]
    assert not any(response.duplicate for response in responses)
    for conversation_id in conversations:
        assert (await get_conversation(stub, conversation_id)).message_count == 10
