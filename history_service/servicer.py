"""duplex.history.v1.HistoryService over gRPC: request validation and proto conversion, nothing else."""

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from duplex.common.errors import InvalidArgument
from duplex.history.v1 import history_pb2, history_pb2_grpc
from history_service import page_tokens
from history_service.domain import (
    Conversation,
    Message,
    MessageStatus,
    NewMessage,
    Role,
    SearchHit,
    SessionEnd,
    SessionRecord,
    SessionRecordStatus,
    UsageRecord,
)
from history_service.export import export_json, export_markdown
from history_service.repository import Clock, HistoryRepository, canonical_id, utc_now
from history_service.search import MessageSearch, SearchQuery, parse_search_query
from history_service.sessions import SessionRecords

SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name

DEFAULT_TITLE = "New conversation"
MAX_TITLE_CHARS = 200
MAX_CONTENT_CHARS = 100_000
# The column width for user ids, client message ids and model names.
MAX_KEY_CHARS = 255
DEFAULT_CONVERSATION_PAGE_SIZE = 50
MAX_CONVERSATION_PAGE_SIZE = 200
DEFAULT_MESSAGE_PAGE_SIZE = 100
MAX_MESSAGE_PAGE_SIZE = 1000
DEFAULT_SEARCH_PAGE_SIZE = 20
MAX_SEARCH_PAGE_SIZE = 100
MAX_QUERY_CHARS = 500
DEFAULT_USAGE_DAYS = 30
MAX_USAGE_DAYS = 366
DAY_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")

ROLE_FROM_PROTO = {
    history_pb2.ROLE_SYSTEM: Role.SYSTEM,
    history_pb2.ROLE_USER: Role.USER,
    history_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    history_pb2.ROLE_TOOL: Role.TOOL,
}
ROLE_TO_PROTO = {role: value for value, role in ROLE_FROM_PROTO.items()}
STATUS_FROM_PROTO = {
    history_pb2.MESSAGE_STATUS_UNSPECIFIED: MessageStatus.COMPLETE,
    history_pb2.MESSAGE_STATUS_COMPLETE: MessageStatus.COMPLETE,
    history_pb2.MESSAGE_STATUS_CANCELLED: MessageStatus.CANCELLED,
    history_pb2.MESSAGE_STATUS_INTERRUPTED: MessageStatus.INTERRUPTED,
    history_pb2.MESSAGE_STATUS_ERROR: MessageStatus.ERROR,
}
STATUS_TO_PROTO = {
    MessageStatus.COMPLETE: history_pb2.MESSAGE_STATUS_COMPLETE,
    MessageStatus.CANCELLED: history_pb2.MESSAGE_STATUS_CANCELLED,
    MessageStatus.INTERRUPTED: history_pb2.MESSAGE_STATUS_INTERRUPTED,
    MessageStatus.ERROR: history_pb2.MESSAGE_STATUS_ERROR,
}
SESSION_STATUS_TO_PROTO = {
    SessionRecordStatus.PENDING: history_pb2.SESSION_RECORD_STATUS_PENDING,
    SessionRecordStatus.DONE: history_pb2.SESSION_RECORD_STATUS_DONE,
    SessionRecordStatus.FAILED: history_pb2.SESSION_RECORD_STATUS_FAILED,
}
EXPORTERS = {
    history_pb2.EXPORT_FORMAT_UNSPECIFIED: export_json,
    history_pb2.EXPORT_FORMAT_JSON: export_json,
    history_pb2.EXPORT_FORMAT_MARKDOWN: export_markdown,
}


T = TypeVar("T")


class ShieldedWrites:
    """Database writes run to completion even when their caller goes away: cancelling a driver in the
    middle of a commit can leave its connection half-closed (aiosqlite then never finishes closing)."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task] = set()

    async def run(self, write: Awaitable[T]) -> T:
        task = asyncio.ensure_future(write)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def wait(self) -> None:
        """Let the writes in flight finish (before the engine is disposed)."""
        await asyncio.gather(*self._running, return_exceptions=True)


class HistoryServicer(history_pb2_grpc.HistoryServiceServicer):
    def __init__(
        self,
        repository: HistoryRepository,
        search: MessageSearch,
        session_records: SessionRecords,
        *,
        wake_job_worker: Callable[[], None] = lambda: None,
        clock: Clock = utc_now,
    ):
        self._repository = repository
        self._search = search
        self._session_records = session_records
        # Called after a job was queued, so this process's worker picks it up without waiting for its poll.
        self._wake_job_worker = wake_job_worker
        self._clock = clock
        self.writes = ShieldedWrites()

    async def CreateConversation(
        self, request: history_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.CreateConversationResponse:
        user_id = require_user_id(request.user_id)
        conversation = await self.writes.run(self._repository.create_conversation(user_id, clean_title(request.title)))
        return history_pb2.CreateConversationResponse(conversation=conversation_to_proto(conversation))

    async def GetConversation(
        self, request: history_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.GetConversationResponse:
        user_id = require_user_id(request.user_id)
        conversation = await self._repository.get_conversation(user_id, request.conversation_id)
        return history_pb2.GetConversationResponse(conversation=conversation_to_proto(conversation))

    async def ListConversations(
        self, request: history_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListConversationsResponse:
        user_id = require_user_id(request.user_id)
        limit = page_size(request.page_size, DEFAULT_CONVERSATION_PAGE_SIZE, MAX_CONVERSATION_PAGE_SIZE)
        after = page_tokens.decode_conversation_token(request.page_token)
        page = await self._repository.list_conversations(user_id, limit, after)
        return history_pb2.ListConversationsResponse(
            conversations=[conversation_to_proto(conversation) for conversation in page.conversations],
            next_page_token=page_tokens.encode_conversation_token(page.next_cursor) if page.next_cursor else "",
        )

    async def DeleteConversation(
        self, request: history_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.DeleteConversationResponse:
        user_id = require_user_id(request.user_id)
        await self.writes.run(self._repository.delete_conversation(user_id, request.conversation_id))
        return history_pb2.DeleteConversationResponse()

    async def AppendMessage(
        self, request: history_pb2.AppendMessageRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.AppendMessageResponse:
        user_id = require_user_id(request.user_id)
        result = await self.writes.run(self._repository.append_message(user_id, new_message_from_request(request)))
        return history_pb2.AppendMessageResponse(
            message=message_to_proto(result.message),
            duplicate=result.duplicate,
            conversation_message_count=result.conversation_message_count,
        )

    async def ListMessages(
        self, request: history_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListMessagesResponse:
        user_id = require_user_id(request.user_id)
        limit = page_size(request.page_size, DEFAULT_MESSAGE_PAGE_SIZE, MAX_MESSAGE_PAGE_SIZE)
        newest_first = request.newest_first
        after_pk = page_tokens.decode_message_token(request.page_token, newest_first=newest_first)
        page = await self._repository.list_messages(
            user_id, request.conversation_id, limit, after_pk, newest_first=newest_first
        )
        next_token = ""
        if page.next_after_pk is not None:
            next_token = page_tokens.encode_message_token(page.next_after_pk, newest_first=newest_first)
        return history_pb2.ListMessagesResponse(
            messages=[message_to_proto(message) for message in page.messages], next_page_token=next_token
        )

    async def RenameConversation(
        self, request: history_pb2.RenameConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.RenameConversationResponse:
        user_id = require_user_id(request.user_id)
        title = limit_chars(request.title.strip(), MAX_TITLE_CHARS, "title")
        if not title:
            raise InvalidArgument(f"title must be 1 to {MAX_TITLE_CHARS} characters")
        conversation = await self.writes.run(
            self._repository.rename_conversation(user_id, request.conversation_id, title)
        )
        return history_pb2.RenameConversationResponse(conversation=conversation_to_proto(conversation))

    async def SearchMessages(
        self, request: history_pb2.SearchMessagesRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.SearchMessagesResponse:
        user_id = require_user_id(request.user_id)
        query = search_query(request.query)
        limit = page_size(request.page_size, DEFAULT_SEARCH_PAGE_SIZE, MAX_SEARCH_PAGE_SIZE)
        offset = page_tokens.decode_search_token(request.page_token, request.query)
        page = await self._search.search(user_id, query, limit, offset)
        next_offset = page.next_offset
        next_token = "" if next_offset is None else page_tokens.encode_search_token(next_offset, request.query)
        return history_pb2.SearchMessagesResponse(
            hits=[search_hit_to_proto(hit) for hit in page.hits], next_page_token=next_token
        )

    async def ExportConversation(
        self, request: history_pb2.ExportConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ExportConversationResponse:
        user_id = require_user_id(request.user_id)
        exporter = EXPORTERS.get(request.format)
        if exporter is None:
            raise InvalidArgument("format must be EXPORT_FORMAT_JSON or EXPORT_FORMAT_MARKDOWN")
        conversation, messages = await self._repository.conversation_with_messages(user_id, request.conversation_id)
        export = exporter(conversation, messages)
        return history_pb2.ExportConversationResponse(
            content=export.content, content_type=export.content_type, filename=export.filename
        )

    async def GetUsage(
        self, request: history_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.GetUsageResponse:
        user_id = require_user_id(request.user_id)
        first_day, last_day = usage_range(request.from_day, request.to_day, today=self._clock().astimezone(UTC).date())
        records = await self._repository.usage(user_id, first_day, last_day)
        return history_pb2.GetUsageResponse(records=[usage_to_proto(record) for record in records])

    async def RecordSessionEnd(
        self, request: history_pb2.RecordSessionEndRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.RecordSessionEndResponse:
        if await self.writes.run(self._session_records.record_end(session_end_from_request(request))):
            self._wake_job_worker()
        return history_pb2.RecordSessionEndResponse()

    async def ListSessionRecords(
        self, request: history_pb2.ListSessionRecordsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListSessionRecordsResponse:
        user_id = require_user_id(request.user_id)
        records = await self._session_records.list_for_conversation(user_id, request.conversation_id)
        return history_pb2.ListSessionRecordsResponse(records=[session_record_to_proto(record) for record in records])


def require_user_id(user_id: str) -> str:
    if not user_id:
        raise InvalidArgument("user_id is required")
    return limit_chars(user_id, MAX_KEY_CHARS, "user_id")


def limit_chars(value: str, max_chars: int, field: str) -> str:
    """The value, unless it is too long or holds a NUL character (which PostgreSQL text cannot store)."""
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is longer than {max_chars} characters")
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")
    return value


def clean_title(title: str) -> str:
    return limit_chars(title.strip(), MAX_TITLE_CHARS, "title") or DEFAULT_TITLE


def page_size(requested: int, default: int, maximum: int) -> int:
    # Too large is clamped rather than refused, so clients can ask for "as many as you allow".
    return min(requested or default, maximum)


def new_message_from_request(request: history_pb2.AppendMessageRequest) -> NewMessage:
    role = ROLE_FROM_PROTO.get(request.role)
    if role is None:
        raise InvalidArgument("role must be ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM or ROLE_TOOL")
    status = STATUS_FROM_PROTO.get(request.status)
    if status is None:
        raise InvalidArgument("unknown message status")
    return NewMessage(
        conversation_id=request.conversation_id,
        role=role,
        content=limit_chars(request.content, MAX_CONTENT_CHARS, "content"),
        status=status,
        client_message_id=limit_chars(request.client_message_id, MAX_KEY_CHARS, "client_message_id") or None,
        model=limit_chars(request.model, MAX_KEY_CHARS, "model"),
        prompt_tokens=request.prompt_tokens,
        completion_tokens=request.completion_tokens,
        parent_message_id=parent_message_id(request.parent_message_id),
        tool_calls_json=tool_calls_json(request.tool_calls_json),
        tool_call_id=limit_chars(request.tool_call_id, MAX_KEY_CHARS, "tool_call_id"),
        tool_name=limit_chars(request.tool_name, MAX_KEY_CHARS, "tool_name"),
    )


def parent_message_id(value: str) -> str | None:
    if not value:
        return None
    stored = canonical_id(value)
    if stored is None:
        raise InvalidArgument("parent_message_id is not a message id")
    return stored


def tool_calls_json(value: str) -> str:
    """Empty, or a JSON array of objects (exports and summaries read it back)."""
    if not value:
        return ""
    limit_chars(value, MAX_CONTENT_CHARS, "tool_calls_json")
    try:
        calls = json.loads(value)
    except ValueError:
        raise InvalidArgument("tool_calls_json is not valid JSON") from None
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise InvalidArgument("tool_calls_json must be a JSON array of objects")
    return value


def search_query(text: str) -> SearchQuery:
    limit_chars(text, MAX_QUERY_CHARS, "query")
    query = parse_search_query(text)
    if query is None:
        raise InvalidArgument("query has no words to search for")
    return query


def parse_day(text: str, field: str) -> date:
    try:
        if DAY_FORMAT.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise InvalidArgument(f"{field} must be a date as YYYY-MM-DD")


def usage_range(from_day: str, to_day: str, today: date) -> tuple[date, date]:
    """Both days included; empty to_day is today, empty from_day is 30 days before to_day."""
    last = parse_day(to_day, "to_day") if to_day else today
    first = parse_day(from_day, "from_day") if from_day else last - timedelta(days=DEFAULT_USAGE_DAYS)
    if first > last:
        raise InvalidArgument("from_day is after to_day")
    if (last - first).days + 1 > MAX_USAGE_DAYS:
        raise InvalidArgument(f"the range covers more than {MAX_USAGE_DAYS} days")
    return first, last


def session_end_from_request(request: history_pb2.RecordSessionEndRequest) -> SessionEnd:
    user_id = require_user_id(request.user_id)
    if not request.session_id:
        raise InvalidArgument("session_id is required")
    if not request.HasField("started_at") or not request.HasField("ended_at"):
        raise InvalidArgument("started_at and ended_at are required")
    started_at = request.started_at.ToDatetime(tzinfo=UTC)
    ended_at = request.ended_at.ToDatetime(tzinfo=UTC)
    if ended_at < started_at:
        raise InvalidArgument("ended_at is before started_at")
    return SessionEnd(
        user_id=user_id,
        session_id=limit_chars(request.session_id, MAX_KEY_CHARS, "session_id"),
        conversation_id=request.conversation_id,
        started_at=started_at,
        ended_at=ended_at,
    )


def conversation_to_proto(conversation: Conversation) -> history_pb2.Conversation:
    return history_pb2.Conversation(
        conversation_id=conversation.id,
        user_id=conversation.user_id,
        title=conversation.title,
        created_at=timestamp(conversation.created_at),
        updated_at=timestamp(conversation.updated_at),
        message_count=conversation.message_count,
    )


def message_to_proto(message: Message) -> history_pb2.Message:
    return history_pb2.Message(
        message_id=message.id,
        conversation_id=message.conversation_id,
        role=ROLE_TO_PROTO[message.role],
        content=message.content,
        status=STATUS_TO_PROTO[message.status],
        client_message_id=message.client_message_id or "",
        model=message.model,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        created_at=timestamp(message.created_at),
        tool_calls_json=message.tool_calls_json,
        tool_call_id=message.tool_call_id,
        tool_name=message.tool_name,
        parent_message_id=message.parent_message_id or "",
    )


def search_hit_to_proto(hit: SearchHit) -> history_pb2.SearchHit:
    return history_pb2.SearchHit(
        message=message_to_proto(hit.message), conversation_title=hit.conversation_title, snippet=hit.snippet
    )


def usage_to_proto(record: UsageRecord) -> history_pb2.UsageRecord:
    return history_pb2.UsageRecord(
        day=record.day.isoformat(),
        model=record.model,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        messages=record.messages,
    )


def session_record_to_proto(record: SessionRecord) -> history_pb2.SessionRecord:
    duration = Duration()
    duration.FromTimedelta(record.duration)
    return history_pb2.SessionRecord(
        session_id=record.session_id,
        conversation_id=record.conversation_id,
        started_at=timestamp(record.started_at),
        ended_at=timestamp(record.ended_at),
        duration=duration,
        summary=record.summary,
        status=SESSION_STATUS_TO_PROTO[record.status],
    )


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
