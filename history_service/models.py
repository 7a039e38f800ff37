"""ORM tables. Portable between SQLite and PostgreSQL so Alembic can take over from create_all later."""

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from history_service.domain import MessageStatus, Role

# Deterministic constraint names, so future Alembic migrations can refer to (and drop) them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s_%(column_1_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
ID_LENGTH = 36  # a canonical UUID string
KEY_LENGTH = 255  # user ids, client message ids, model names


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
        # Serves paging a conversation's messages in order, and the ON DELETE CASCADE lookup.
        Index("ix_messages_conversation_id_pk", "conversation_id", "pk"),
        # AUTOINCREMENT keeps SQLite from reusing the pk of a deleted last row, so cursors only move forward.
        {"sqlite_autoincrement": True},
    )

    # SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
    pk: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(ID_LENGTH), unique=True)
    conversation_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"))
    # Reserved for branching (edit-and-regenerate); nothing sets it yet.
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
