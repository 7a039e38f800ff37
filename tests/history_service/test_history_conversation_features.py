"""Rename, tool messages, export and usage, on both backends."""

import asyncio
import json
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from sqlalchemy import insert

from duplex.history.v1 import history_pb2
from history_service.models import UsageDailyRow

ALICE = "alice"
BOB = "bob"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def conversation_id(create_conversation) -> str:
    return (await create_conversation(ALICE, "Trip planning")).conversation_id


def rename(stub, conversation_id: str, title: str, user_id: str = ALICE):
    request = history_pb2.RenameConversationRequest(user_id=user_id, conversation_id=conversation_id, title=title)
    return stub.RenameConversation(request)


async def get(stub, conversation_id: str) -> history_pb2.Conversation:
    request = history_pb2.GetConversationRequest(user_id=ALICE, conversation_id=conversation_id)
    return (await stub.GetConversation(request)).conversation


# --- RenameConversation ---


async def test_rename_sets_a_trimmed_title_and_keeps_updated_at(stub, conversation_id):
    before = await get(stub, conversation_id)

    renamed = (await rename(stub, conversation_id, "  Lisbon in May \n")).conversation

    assert renamed.title == "Lisbon in May"
    assert await get(stub, conversation_id) == renamed
    assert renamed.updated_at == before.updated_at


async def test_rename_needs_1_to_200_characters(stub, conversation_id, status_of):
    bad_titles = ["", "   ", "t" * 201, "nul\x00"]
    statuses = {title: await status_of(rename(stub, conversation_id, title)) for title in bad_titles}
    assert statuses == dict.fromkeys(bad_titles, INVALID)
    assert (await rename(stub, conversation_id, "t" * 200)).conversation.title == "t" * 200


async def test_rename_of_someone_elses_or_unknown_conversation_is_not_found(stub, conversation_id, status_of):
    assert await status_of(rename(stub, conversation_id, "mine now", user_id=BOB)) == NOT_FOUND
    assert await status_of(rename(stub, "not-an-id", "x")) == NOT_FOUND
    assert (await get(stub, conversation_id)).title == "Trip planning"


# --- tool messages ---

TOOL_CALLS = '[{"id": "call-1", "name": "weather", "arguments": "{\\"city\\": \\"Lisbon\\"}"}]'


async def test_tool_calls_and_results_round_trip(stub, conversation_id, append_message):
    question = (await append_message(conversation_id, "Weather in Lisbon?")).message
    call = (
        await append_message(
            conversation_id,
            "",
            role=history_pb2.ROLE_ASSISTANT,
            tool_calls_json=TOOL_CALLS,
            parent_message_id=question.message_id,
        )
    ).message
    result = (
        await append_message(
            conversation_id,
            '{"temperature": 21}',
            role=history_pb2.ROLE_TOOL,
            tool_call_id="call-1",
            tool_name="weather",
            parent_message_id=call.message_id.upper(),
        )
    ).message

    listed = await stub.ListMessages(history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id))

    assert list(listed.messages) == [question, call, result]
    assert (call.tool_calls_json, call.parent_message_id) == (TOOL_CALLS, question.message_id)
    assert (result.role, result.tool_call_id, result.tool_name) == (history_pb2.ROLE_TOOL, "call-1", "weather")
    assert result.parent_message_id == call.message_id
    assert question.parent_message_id == question.tool_calls_json == ""


async def test_tool_calls_must_be_a_json_array_of_objects(conversation_id, append_message, status_of):
    bad = ["not json", '{"id": "x"}', "[1, 2]", '["call"]', "[{}"]

    def append(tool_calls_json: str):
        return append_message(conversation_id, role=history_pb2.ROLE_ASSISTANT, tool_calls_json=tool_calls_json)

    statuses = {tool_calls_json: await status_of(append(tool_calls_json)) for tool_calls_json in bad}
    assert statuses == dict.fromkeys(bad, INVALID)


async def test_parent_must_be_a_message_of_the_same_conversation(
    create_conversation, conversation_id, append_message, status_of
):
    other = (await create_conversation(ALICE, "other")).conversation_id
    elsewhere = (await append_message(other, "elsewhere")).message.message_id

    assert await status_of(append_message(conversation_id, parent_message_id="nope")) == INVALID
    assert await status_of(append_message(conversation_id, parent_message_id=elsewhere)) == INVALID


async def test_a_refused_parent_leaves_the_conversation_as_it_was(stub, conversation_id, append_message, status_of):
    # The conversation is bumped before the parent is checked: the refusal must roll that back.
    parent = (await append_message(conversation_id, "question")).message
    before = await get(stub, conversation_id)

    refused = append_message(conversation_id, parent_message_id="00000000-0000-0000-0000-000000000000")
    assert await status_of(refused) == INVALID
    assert await get(stub, conversation_id) == before

    answer = await append_message(conversation_id, "answer", parent_message_id=parent.message_id)
    assert answer.message.parent_message_id == parent.message_id
    assert answer.conversation_message_count == 2


async def test_nul_characters_are_refused_on_every_backend(conversation_id, append_message, status_of):
    assert await status_of(append_message(conversation_id, "a\x00b")) == INVALID
    assert await status_of(append_message(conversation_id, client_message_id="k\x00")) == INVALID


# --- ExportConversation ---


async def fill_conversation(conversation_id: str, append_message) -> None:
    await append_message(conversation_id, "You are concise.", role=history_pb2.ROLE_SYSTEM)
    await append_message(conversation_id, "Weather in **Lisbon**?", client_message_id="c1")
    await append_message(conversation_id, "", role=history_pb2.ROLE_ASSISTANT, tool_calls_json=TOOL_CALLS)
    await append_message(
        conversation_id, '{"note": "```"}', role=history_pb2.ROLE_TOOL, tool_call_id="call-1", tool_name="weather"
    )
    await append_message(
        conversation_id,
        "Sunny, 21 degrees.",
        role=history_pb2.ROLE_ASSISTANT,
        model="demo-model",
        status=history_pb2.MESSAGE_STATUS_CANCELLED,
        prompt_tokens=12,
        completion_tokens=5,
    )


def export(stub, conversation_id: str, export_format: int, user_id: str = ALICE):
    request = history_pb2.ExportConversationRequest(
        user_id=user_id, conversation_id=conversation_id, format=export_format
    )
    return stub.ExportConversation(request)


@pytest.mark.parametrize("export_format", [history_pb2.EXPORT_FORMAT_UNSPECIFIED, history_pb2.EXPORT_FORMAT_JSON])
async def test_json_export_holds_the_conversation_and_every_message(
    stub, conversation_id, append_message, export_format
):
    await fill_conversation(conversation_id, append_message)

    exported = await export(stub, conversation_id, export_format)
    document = json.loads(exported.content)

    assert exported.content_type == "application/json"
    assert exported.filename == f"trip-planning-{conversation_id[:8]}.json"
    assert document["conversation"]["id"] == conversation_id
    assert document["conversation"]["title"] == "Trip planning"
    assert document["conversation"]["message_count"] == 5
    messages = document["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1]["client_message_id"] == "c1"
    assert messages[2]["tool_calls"] == json.loads(TOOL_CALLS)
    assert (messages[3]["tool_call_id"], messages[3]["tool_name"]) == ("call-1", "weather")
    last = messages[4]
    assert (last["content"], last["status"], last["model"]) == ("Sunny, 21 degrees.", "cancelled", "demo-model")
    assert (last["prompt_tokens"], last["completion_tokens"]) == (12, 5)
    assert last["created_at"].endswith("Z")


async def test_markdown_export_is_a_readable_transcript(stub, conversation_id, append_message):
    await fill_conversation(conversation_id, append_message)

    exported = await export(stub, conversation_id, history_pb2.EXPORT_FORMAT_MARKDOWN)
    text = exported.content

    assert exported.content_type == "text/markdown"
    assert exported.filename.endswith(".md")
    assert text.startswith("# Trip planning\n")
    assert "### User · " in text and "Weather in **Lisbon**?" in text
    assert '> Called tool `weather` with `{"city": "Lisbon"}`' in text
    # The tool result holds ``` itself, so its fence is longer.
    assert '````json\n{"note": "```"}\n````' in text
    assert "### Assistant (demo-model) [cancelled] · " in text
    assert text.index("Weather in") < text.index("Sunny, 21 degrees.")


async def test_export_checks_ownership_and_format(stub, conversation_id, status_of):
    assert await status_of(export(stub, conversation_id, history_pb2.EXPORT_FORMAT_JSON, user_id=BOB)) == NOT_FOUND
    assert await status_of(export(stub, conversation_id, 99)) == INVALID


async def test_an_empty_conversation_exports(stub, conversation_id):
    document = json.loads((await export(stub, conversation_id, history_pb2.EXPORT_FORMAT_JSON)).content)
    assert document["messages"] == []


# --- GetUsage ---


def get_usage(stub, user_id: str = ALICE, from_day: str = "", to_day: str = ""):
    return stub.GetUsage(history_pb2.GetUsageRequest(user_id=user_id, from_day=from_day, to_day=to_day))


def usage_rows(response: history_pb2.GetUsageResponse) -> list[tuple]:
    return [(r.model, r.prompt_tokens, r.completion_tokens, r.messages) for r in response.records]


async def answer(append_message, conversation_id: str, model: str, prompt: int, completion: int, **fields):
    return await append_message(
        conversation_id,
        "answer",
        role=history_pb2.ROLE_ASSISTANT,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        **fields,
    )


async def test_usage_adds_up_assistant_messages_per_model_per_day(
    stub, create_conversation, conversation_id, append_message
):
    second = (await create_conversation(ALICE, "second")).conversation_id
    await append_message(conversation_id, "a question", prompt_tokens=999)  # not an assistant: not usage
    await answer(append_message, conversation_id, "model-a", 10, 3)
    await answer(append_message, second, "model-a", 20, 4)
    await answer(append_message, conversation_id, "model-b", 7, 1)
    bobs = (await create_conversation(BOB, "bob's")).conversation_id
    await answer(append_message, bobs, "model-a", 1000, 1000, user_id=BOB)

    response = await get_usage(stub)

    today = datetime.now(UTC).date().isoformat()
    assert [record.day for record in response.records] == [today, today]
    assert usage_rows(response) == [("model-a", 30, 7, 2), ("model-b", 7, 1, 1)]
    assert usage_rows(await get_usage(stub, BOB)) == [("model-a", 1000, 1000, 1)]


async def test_a_duplicate_append_is_not_counted_twice(stub, conversation_id, append_message):
    first = await answer(append_message, conversation_id, "m", 10, 2, client_message_id="turn-1")
    again = await answer(append_message, conversation_id, "m", 10, 2, client_message_id="turn-1")

    assert again.duplicate and not first.duplicate
    assert usage_rows(await get_usage(stub)) == [("m", 10, 2, 1)]


async def test_concurrent_answers_are_all_counted(stub, create_conversation, append_message):
    conversations = [(await create_conversation(ALICE, f"c{n}")).conversation_id for n in range(3)]

    await asyncio.gather(
        *(answer(append_message, conversations[n % 3], "m", 1, 2) for n in range(12)),
    )

    assert usage_rows(await get_usage(stub)) == [("m", 12, 24, 12)]


async def test_usage_is_filtered_by_day_range(stub, database):
    async with database.begin() as connection:
        await connection.execute(
            insert(UsageDailyRow),
            [
                {
                    "user_id": ALICE,
                    "day": date(2020, 1, day),
                    "model": "m",
                    "prompt_tokens": day,
                    "completion_tokens": 0,
                    "messages": 1,
                }
                for day in (1, 15, 31)
            ],
        )

    january = await get_usage(stub, from_day="2020-01-01", to_day="2020-01-15")
    empty_default = await get_usage(stub)
    only_to = await get_usage(stub, to_day="2020-02-01")

    assert [(r.day, r.prompt_tokens) for r in january.records] == [("2020-01-01", 1), ("2020-01-15", 15)]
    assert list(empty_default.records) == []
    # An empty from_day means 30 days before to_day: from 2020-01-02.
    assert [r.day for r in only_to.records] == ["2020-01-15", "2020-01-31"]


BAD_USAGE_RANGES = [
    ("2026-1-1", ""),
    ("20260101", "20260102"),
    ("2026-02-30", "2026-03-01"),
    ("yesterday", ""),
    ("2026-03-02", "2026-03-01"),  # backwards
    ("2024-01-01", "2025-01-01"),  # 367 days
]


async def test_bad_days_and_ranges_are_invalid(stub, status_of):
    statuses = {days: await status_of(get_usage(stub, from_day=days[0], to_day=days[1])) for days in BAD_USAGE_RANGES}
    assert statuses == dict.fromkeys(BAD_USAGE_RANGES, INVALID)


async def test_a_range_of_366_days_is_allowed(stub):
    last = date(2025, 1, 1)
    first = last - timedelta(days=365)
    assert list((await get_usage(stub, from_day=first.isoformat(), to_day=last.isoformat())).records) == []
