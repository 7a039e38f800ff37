"""What the history service stores, independent of SQL and of protobuf.

The repository returns these, the servicer turns them into protos; neither side leaks into the other.
"""

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    user_id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int


@dataclass(frozen=True, slots=True)
class Message:
    # Insertion order inside the database; the cursor for paging, never shown to clients.
    pk: int
    id: str
    conversation_id: str
    parent_message_id: str | None
    role: Role
    content: str
    status: MessageStatus
    client_message_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime
    # For an assistant message, a JSON array of the tools it called; "" for none.
    tool_calls_json: str = ""
    # For a tool message, the call it answers and the tool's name.
    tool_call_id: str = ""
    tool_name: str = ""


@dataclass(frozen=True, slots=True)
class NewMessage:
    conversation_id: str
    role: Role
    content: str
    status: MessageStatus = MessageStatus.COMPLETE
    # Idempotency key unique within the conversation; None means every append stores a new message.
    client_message_id: str | None = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    parent_message_id: str | None = None
    tool_calls_json: str = ""
    tool_call_id: str = ""
    tool_name: str = ""


@dataclass(frozen=True, slots=True)
class AppendResult:
    message: Message
    # True when the client_message_id was already stored and `message` is that earlier message.
    duplicate: bool
    # The conversation's message count right after this append (for a duplicate, its current count).
    conversation_message_count: int


@dataclass(frozen=True, slots=True)
class ConversationCursor:
    """Position after the last conversation of a page, in (updated_at desc, id desc) order."""

    updated_at: datetime
    conversation_id: str


@dataclass(frozen=True, slots=True)
class ConversationPage:
    conversations: list[Conversation]
    next_cursor: ConversationCursor | None


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: list[Message]
    # pk of the last message of this page, or None on the last page.
    next_after_pk: int | None


@dataclass(frozen=True, slots=True)
class SearchHit:
    message: Message
    conversation_title: str
    # The text around the match, matched words wrapped in SNIPPET_MARK.
    snippet: str


@dataclass(frozen=True, slots=True)
class SearchPage:
    hits: list[SearchHit]
    # Offset of the next page, or None on the last page.
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    day: date
    model: str
    prompt_tokens: int
    completion_tokens: int
    messages: int


class SessionRecordStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """What the session service reports when a session closes or expires."""

    user_id: str
    session_id: str
    conversation_id: str
    started_at: datetime
    ended_at: datetime


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    user_id: str
    conversation_id: str
    started_at: datetime
    ended_at: datetime
    duration: timedelta
    summary: str
    status: SessionRecordStatus


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    # Including the run this claim starts.
    attempts: int
    locked_by: str | None
    locked_until: datetime | None
    last_error: str | None = None
