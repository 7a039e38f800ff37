"""ORM tables, portable between SQLite and PostgreSQL.

The migrations in history_service/migrations create the schema; these classes must stay in step with them
(tests compare the two). Full-text search lives only in the migrations, because it is per dialect: a generated
tsvector column on PostgreSQL, an FTS5 table kept in sync by triggers on SQLite.
"""

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from history_service.domain import JobStatus, MessageStatus, Role, SessionRecordStatus

# Deterministic constraint names, so future Alembic migrations can refer to (and drop) them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
ID_LENGTH = 36  # a canonical UUID string
KEY_LENGTH = 255  # user ids, client message ids, model names, session ids


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, also on SQLite, which stores them without a zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _string_enum(enum_class: type[StrEnum]) -> Enum:
    # A plain VARCHAR holding the enum's value: no native PostgreSQL enum type to migrate.
    return Enum(
        enum_class,
        native_enum=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ConversationRow(Base):
    __tablename__ = "conversations"
    # Serves "my conversations, most recently updated first" and keyset paging over it (and user_id lookups).
    __table_args__ = (Index("ix_conversations_user_id_updated_at_id", "user_id", "updated_at", "id"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    title: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    message_count: Mapped[int] = mapped_column(Integer, default=0)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # The idempotency guarantee: concurrent appends of one client_message_id cannot both insert.
        # NULLs are distinct, so messages without a key never collide.
        UniqueConstraint("conversation_id", "client_message_id"),
        # Named by the first schema's naming convention, which is what existing databases have.
        UniqueConstraint("id", name="uq_messages_id_"),
        # Serves paging a conversation's messages in order, and the ON DELETE CASCADE lookup.
        Index("ix_messages_conversation_id_pk", "conversation_id", "pk"),
        # AUTOINCREMENT keeps SQLite from reusing the pk of a deleted last row, so cursors only move forward.
        {"sqlite_autoincrement": True},
    )

    # SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
    pk: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(ID_LENGTH))
    conversation_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"))
    # The message this one follows, in the same conversation; for branching (edit-and-regenerate).
    parent_message_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    role: Mapped[Role] = mapped_column(_string_enum(Role))
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[MessageStatus] = mapped_column(_string_enum(MessageStatus))
    client_message_id: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    model: Mapped[str] = mapped_column(String(KEY_LENGTH), default="")
    # uint32 in the API, which does not fit a PostgreSQL INTEGER.
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # An assistant message's tool calls as a JSON array; "" for none.
    tool_calls_json: Mapped[str] = mapped_column(Text, default="", server_default="")
    # A tool message's answer to one call.
    tool_call_id: Mapped[str] = mapped_column(String(KEY_LENGTH), default="", server_default="")
    tool_name: Mapped[str] = mapped_column(String(KEY_LENGTH), default="", server_default="")


class UsageDailyRow(Base):
    """Tokens per user, model and UTC day, added to in the transaction that stores each assistant message."""

    __tablename__ = "usage_daily"

    # The key is the upsert's conflict target, and in this order also the index GetUsage reads
    # (one user, a range of days).
    user_id: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    messages: Mapped[int] = mapped_column(Integer, default=0)


class SessionRecordRow(Base):
    """A finished session and its summary; the session id makes RecordSessionEnd idempotent."""

    __tablename__ = "session_records"
    __table_args__ = (Index("ix_session_records_conversation_id_ended_at", "conversation_id", "ended_at"),)

    session_id: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    conversation_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    ended_at: Mapped[datetime] = mapped_column(UtcDateTime())
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    summary: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[SessionRecordStatus] = mapped_column(_string_enum(SessionRecordStatus))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class JobRow(Base):
    """A durable unit of background work, claimed by one worker at a time under a lease."""

    __tablename__ = "jobs"
    # Serves the claim: the oldest due job of a status.
    __table_args__ = (Index("ix_jobs_status_run_after", "status", "run_after"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    status: Mapped[JobStatus] = mapped_column(_string_enum(JobStatus))
    # Claims so far, counting the running one.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A queued job is not claimed before this moment (retry backoff).
    run_after: Mapped[datetime] = mapped_column(UtcDateTime())
    locked_by: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    # A running job whose lease has passed belongs to a worker presumed dead, and is claimed again.
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
