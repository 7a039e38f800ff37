"""RecordSessionEnd, ListSessionRecords and the summary the job worker writes through a fake llm_service."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select

from duplex.history.v1 import history_pb2
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from history_service.domain import JobStatus
from history_service.models import JobRow, SessionRecordRow
from history_service.sessions import SUMMARIZE_SESSION

ALICE = "alice"
BOB = "bob"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SUMMARY = "Alice asked about Lisbon. The assistant suggested visiting in May."
STARTED = datetime(2030, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeLlm(llm_pb2_grpc.LlmServiceServicer):
    """Streams SUMMARY in a few chunks, or fails while `failing` is set; remembers every request."""

    def __init__(self) -> None:
        self.requests: list[llm_pb2.GenerateRequest] = []
        self.failing = False

    async def Generate(self, request, context):
        self.requests.append(request)
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model overloaded")
        yield llm_pb2.GenerateResponse(started=llm_pb2.GenerateStarted(model="fake"))
        for piece in (SUMMARY[:20], SUMMARY[20:40], SUMMARY[40:]):
            yield llm_pb2.GenerateResponse(chunk=llm_pb2.TextChunk(text=piece, token_count=1))
        yield llm_pb2.GenerateResponse(finished=llm_pb2.GenerateFinished(finish_reason=llm_pb2.FINISH_REASON_STOP))


@pytest.fixture
async def fake_llm() -> AsyncIterator[tuple[FakeLlm, int]]:
    servicer = FakeLlm()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    llm_pb2_grpc.add_LlmServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(0)


@pytest.fixture
def history_settings(history_settings, fake_llm):
    _, port = fake_llm
    # A poll interval far beyond the tests' patience: summaries only arrive in time if the worker is poked.
    return history_settings.model_copy(
        update={
            "llm_target": f"127.0.0.1:{port}",
            "summary_model": "summary-model",
            "job_poll_interval_seconds": 60.0,
            "job_max_attempts": 3,
            "job_retry_backoff_seconds": 0.01,
        }
    )


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def record_end(stub, conversation_id: str, session_id: str = "session-1", user_id: str = ALICE, **overrides):
    fields = {
        "user_id": user_id,
        "session_id": session_id,
        "conversation_id": conversation_id,
        "started_at": timestamp(STARTED),
        "ended_at": timestamp(STARTED + timedelta(minutes=5, milliseconds=250)),
        **overrides,
    }
    return stub.RecordSessionEnd(history_pb2.RecordSessionEndRequest(**fields))


async def records(stub, conversation_id: str, user_id: str = ALICE) -> list[history_pb2.SessionRecord]:
    request = history_pb2.ListSessionRecordsRequest(user_id=user_id, conversation_id=conversation_id)
    return list((await stub.ListSessionRecords(request)).records)


async def until_status(stub, conversation_id: str, status: int, timeout: float = 10.0) -> history_pb2.SessionRecord:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        [record] = await records(stub, conversation_id)
        if record.status == status:
            return record
        assert asyncio.get_running_loop().time() < deadline, f"record still {record.status}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def conversation_id(create_conversation, append_message) -> str:
    conversation_id = (await create_conversation(ALICE, "Lisbon")).conversation_id
    await append_message(conversation_id, "Be brief.", role=history_pb2.ROLE_SYSTEM)
    await append_message(conversation_id, "When should I visit Lisbon?")
    await append_message(conversation_id, "May is lovely.", role=history_pb2.ROLE_ASSISTANT)
    await append_message(conversation_id, "{}", role=history_pb2.ROLE_TOOL, tool_call_id="call-1")
    return conversation_id


async def test_a_recorded_session_gets_its_summary_from_llm_service(stub, conversation_id, fake_llm):
    llm, _ = fake_llm

    await record_end(stub, conversation_id)
    done = await until_status(stub, conversation_id, history_pb2.SESSION_RECORD_STATUS_DONE)

    assert done.summary == SUMMARY
    assert (done.session_id, done.conversation_id) == ("session-1", conversation_id)
    assert done.started_at.ToDatetime(tzinfo=UTC) == STARTED
    assert done.duration.ToTimedelta() == timedelta(minutes=5, milliseconds=250)
    [request] = llm.requests
    assert request.model == "summary-model"
    assert request.messages[0].role == llm_pb2.ROLE_SYSTEM
    assert request.messages[0].content.startswith("Summarize")
    # The conversation's user and assistant messages follow; its own system prompt and tool output do not.
    assert [(m.role, m.content) for m in request.messages[1:]] == [
        (llm_pb2.ROLE_USER, "When should I visit Lisbon?"),
        (llm_pb2.ROLE_ASSISTANT, "May is lovely."),
    ]


async def test_recording_a_session_again_changes_nothing(stub, conversation_id, database):
    await asyncio.gather(*(record_end(stub, conversation_id) for _ in range(3)))
    await record_end(stub, conversation_id, ended_at=timestamp(STARTED + timedelta(hours=9)))

    [record] = await records(stub, conversation_id)
    assert record.duration.ToTimedelta() == timedelta(minutes=5, milliseconds=250)
    async with database.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(SessionRecordRow)) == 1
        assert (await connection.execute(select(JobRow.kind, JobRow.payload))).all() == [
            (SUMMARIZE_SESSION, {"session_id": "session-1"})
        ]


async def test_records_are_listed_newest_first_and_only_to_their_owner(stub, conversation_id, status_of):
    for n in range(3):
        ended = STARTED + timedelta(hours=n + 1)
        await record_end(stub, conversation_id, session_id=f"s{n}", ended_at=timestamp(ended))

    assert [record.session_id for record in await records(stub, conversation_id)] == ["s2", "s1", "s0"]
    assert await status_of(records(stub, conversation_id, user_id=BOB)) == NOT_FOUND


async def test_record_session_end_validates_its_request(stub, conversation_id, status_of):
    before = timestamp(STARTED - timedelta(seconds=1))
    assert await status_of(record_end(stub, conversation_id, user_id="")) == INVALID
    assert await status_of(record_end(stub, conversation_id, session_id="")) == INVALID
    assert await status_of(record_end(stub, conversation_id, session_id="s" * 256)) == INVALID
    assert await status_of(record_end(stub, conversation_id, ended_at=before)) == INVALID
    request = history_pb2.RecordSessionEndRequest(user_id=ALICE, session_id="s", conversation_id=conversation_id)
    assert await status_of(stub.RecordSessionEnd(request)) == INVALID
    assert await status_of(record_end(stub, conversation_id, user_id=BOB)) == NOT_FOUND
    assert await status_of(record_end(stub, "not-a-conversation")) == NOT_FOUND
    assert await records(stub, conversation_id) == []


async def test_a_failing_llm_service_is_retried_then_the_record_fails(stub, conversation_id, fake_llm, database):
    # The retries (10 ms, 20 ms) come due long before the next poll: the worker wakes up for them itself.
    llm, _ = fake_llm
    llm.failing = True
    await record_end(stub, conversation_id)
    failed = await until_status(stub, conversation_id, history_pb2.SESSION_RECORD_STATUS_FAILED)

    assert failed.summary == ""
    assert len(llm.requests) == 3
    async with database.connect() as connection:
        job = (await connection.execute(select(JobRow.status, JobRow.attempts, JobRow.last_error))).one()
    assert (job.status, job.attempts) == (JobStatus.FAILED, 3)
    assert "model overloaded" in job.last_error


async def test_deleting_the_conversation_removes_its_records(stub, conversation_id, fake_llm, database):
    await record_end(stub, conversation_id)
    await stub.DeleteConversation(history_pb2.DeleteConversationRequest(user_id=ALICE, conversation_id=conversation_id))

    async with database.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(SessionRecordRow)) == 0
