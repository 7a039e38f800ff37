"""Conversations and messages in SQL, per user. Plain async methods in, domain dataclasses out.

A conversation that does not exist, belongs to someone else or has a malformed id is NotFound:
callers cannot tell these apart, so nobody learns that another user's conversation exists.
"""

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime

from sqlalchemy import Insert, Select, Update, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from duplex.common.errors import InvalidArgument, NotFound
from history_service.domain import (
    AppendResult,
    Conversation,
    ConversationCursor,
    ConversationPage,
    Message,
    MessagePage,
    NewMessage,
    Role,
    UsageRecord,
)
from history_service.models import ConversationRow, MessageRow, UsageDailyRow, UtcDateTime

Clock = Callable[[], datetime]

CONVERSATIONS = ConversationRow.__table__
MESSAGES = MessageRow.__table__
USAGE_DAILY = UsageDailyRow.__table__


def utc_now() -> datetime:
    return datetime.now(UTC)


def canonical_id(value: str) -> str | None:
    """The stored form of a UUID string, or None when it is not one."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        return None


def _conversation_not_found() -> NotFound:
    return NotFound("conversation not found")


def dialect_name(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


class HistoryRepository:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, clock: Clock = utc_now):
        self._sessionmaker = sessionmaker
        # Appends skip the ORM session: they run on a plain connection, the cheapest path per turn.
        self._engine: AsyncEngine = sessionmaker.kw["bind"]
        self._clock = clock

    async def create_conversation(self, user_id: str, title: str) -> Conversation:
        now = self._clock()
        row = ConversationRow(
            id=str(uuid.uuid4()),
            user_id=user_id,
            title=title,
            created_at=now,
            updated_at=now,
            message_count=0,
        )
        async with self._sessionmaker() as session:
            session.add(row)
            await session.commit()
        return to_conversation(row)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation:
        async with self._sessionmaker() as session:
            row = await owned_conversation(session, user_id, conversation_id)
            return to_conversation(row)

    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None = None
    ) -> ConversationPage:
        """Most recently updated first; ties broken by id so paging is stable with equal timestamps."""
        _require_positive(limit)
        query = select(ConversationRow).where(ConversationRow.user_id == user_id)
        if after is not None:
            query = query.where(
                or_(
                    ConversationRow.updated_at < after.updated_at,
                    and_(
                        ConversationRow.updated_at == after.updated_at,
                        ConversationRow.id < after.conversation_id,
                    ),
                )
            )
        query = query.order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
        async with self._sessionmaker() as session:
            rows = (await session.scalars(query.limit(limit + 1))).all()
        conversations = [to_conversation(row) for row in rows[:limit]]
        has_more = len(rows) > limit
        next_cursor = ConversationCursor(conversations[-1].updated_at, conversations[-1].id) if has_more else None
        return ConversationPage(conversations, next_cursor)

    async def rename_conversation(self, user_id: str, conversation_id: str, title: str) -> Conversation:
        """Set the title; updated_at stays, since it tracks messages (and orders the conversation list)."""
        async with self._sessionmaker() as session:
            row = await owned_conversation(session, user_id, conversation_id)
            row.title = title
            await session.commit()
        return to_conversation(row)

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        """Delete it; its messages go with it through ON DELETE CASCADE."""
        stored_id = canonical_id(conversation_id)
        if stored_id is None:
            raise _conversation_not_found()
        statement = (
            delete(ConversationRow)
            .where(ConversationRow.id == stored_id, ConversationRow.user_id == user_id)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session:
            result = await session.execute(statement)
            if result.rowcount == 0:
                raise _conversation_not_found()
            await session.commit()

    async def append_message(self, user_id: str, new: NewMessage) -> AppendResult:
        """Store a message once per (conversation, client_message_id), even when appends race.

        The unique constraint is the arbiter: the losing insert fails, its transaction (including the
        conversation bump) rolls back, and the caller gets the winner's message marked duplicate.
        """
        conversation_id = canonical_id(new.conversation_id)
        if conversation_id is None:
            raise _conversation_not_found()
        try:
            message, count = await self._insert_message(user_id, conversation_id, new)
            return AppendResult(message, duplicate=False, conversation_message_count=count)
        except IntegrityError:
            if new.client_message_id is None:
                raise
            found = await self._find_by_client_message_id(user_id, conversation_id, new.client_message_id)
            if found is None:
                raise
            original, count = found
            return AppendResult(original, duplicate=True, conversation_message_count=count)

    async def list_messages(
        self,
        user_id: str,
        conversation_id: str,
        limit: int,
        after_pk: int | None = None,
        *,
        newest_first: bool = False,
    ) -> MessagePage:
        """Oldest first, in insertion order; or newest first, where "after" a pk means older than it.

        Core rows on a plain connection: a client that lost its cached context reads it back through here.
        """
        _require_positive(limit)
        stored_id = canonical_id(conversation_id)
        if stored_id is None:
            raise _conversation_not_found()
        query = MESSAGE_PAGES[newest_first, after_pk is not None]
        parameters = {"m_conversation_id": stored_id, "m_after_pk": after_pk, "m_limit": limit + 1}
        async with self._engine.connect() as connection:
            owned = await connection.execute(OWNED_CONVERSATION, {"o_id": stored_id, "o_user_id": user_id})
            if owned.first() is None:
                raise _conversation_not_found()
            rows = (await connection.execute(query, parameters)).all()
        messages = [to_message(row) for row in rows[:limit]]
        has_more = len(rows) > limit
        return MessagePage(messages, messages[-1].pk if has_more else None)

    async def conversation_with_messages(
        self, user_id: str, conversation_id: str
    ) -> tuple[Conversation, list[Message]]:
        """The whole conversation, oldest message first (for export and summaries)."""
        async with self._sessionmaker() as session:
            conversation = await owned_conversation(session, user_id, conversation_id)
            query = select(MessageRow).where(MessageRow.conversation_id == conversation.id).order_by(MessageRow.pk)
            rows = (await session.scalars(query)).all()
        return to_conversation(conversation), [to_message(row) for row in rows]

    async def usage(self, user_id: str, first_day: date, last_day: date) -> list[UsageRecord]:
        """Per model per day, oldest day first, both days included."""
        query = (
            select(UsageDailyRow)
            .where(UsageDailyRow.user_id == user_id, UsageDailyRow.day.between(first_day, last_day))
            .order_by(UsageDailyRow.day, UsageDailyRow.model)
        )
        async with self._sessionmaker() as session:
            rows = (await session.scalars(query)).all()
        return [UsageRecord(row.day, row.model, row.prompt_tokens, row.completion_tokens, row.messages) for row in rows]

    async def _insert_message(self, user_id: str, conversation_id: str, new: NewMessage) -> tuple[Message, int]:
        """The stored message and the conversation's message count including it.

        The hot path of every turn, so it is Core statements built once, on a plain connection: two
        statements for a user message (three with an assistant's usage) and the commit.
        """
        values = _message_values(conversation_id, new, self._clock())
        async with self._engine.begin() as connection:
            # Write to the conversation first: it checks ownership and takes the write lock (a row lock
            # on PostgreSQL, the database lock on SQLite) before anything is read, so concurrent appends
            # queue up here instead of failing to upgrade a read transaction. RETURNING gives the count.
            count = await _bump_conversation(connection, user_id, conversation_id, values["created_at"])
            if new.parent_message_id is not None:
                await _require_message_in(connection, conversation_id, new.parent_message_id)
            # A duplicate client_message_id fails here, before usage is counted.
            inserted = await connection.execute(INSERT_MESSAGE, values)
            if new.role is Role.ASSISTANT:
                await connection.execute(USAGE_UPSERTS[connection.dialect.name], _usage_values(user_id, values))
        return Message(pk=inserted.inserted_primary_key[0], **values), count

    async def _find_by_client_message_id(
        self, user_id: str, conversation_id: str, client_message_id: str
    ) -> tuple[Message, int] | None:
        """The stored message and its conversation's current message count."""
        query = (
            select(MessageRow, ConversationRow.message_count)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .where(
                ConversationRow.user_id == user_id,
                MessageRow.conversation_id == conversation_id,
                MessageRow.client_message_id == client_message_id,
            )
        )
        async with self._sessionmaker() as session:
            found = (await session.execute(query)).first()
        return (to_message(found[0]), found[1]) if found is not None else None


async def owned_conversation(session: AsyncSession, user_id: str, conversation_id: str) -> ConversationRow:
    """The user's conversation, or NotFound (also for someone else's, and for malformed ids)."""
    stored_id = canonical_id(conversation_id)
    if stored_id is None:
        raise _conversation_not_found()
    row = await session.get(ConversationRow, stored_id)
    if row is None or row.user_id != user_id:
        raise _conversation_not_found()
    return row


def _require_positive(limit: int) -> None:
    # A page needs room for at least one row, or its cursor would have nothing to point at.
    if limit < 1:
        raise ValueError(f"page limit must be at least 1, got {limit}")


# The per-turn statements, built once: building and cache-keying a statement per call costs more CPU than
# SQLite takes to run it. Parameters come at execution.
BUMP_CONVERSATION: Update = (
    update(CONVERSATIONS)
    .where(CONVERSATIONS.c.id == bindparam("b_id"), CONVERSATIONS.c.user_id == bindparam("b_user_id"))
    .values(updated_at=bindparam("b_now", type_=UtcDateTime()), message_count=CONVERSATIONS.c.message_count + 1)
    .returning(CONVERSATIONS.c.message_count)
)
# Its columns come from the parameters; the pk comes back as lastrowid (SQLite) or through RETURNING.
INSERT_MESSAGE: Insert = insert(MESSAGES)
PARENT_IN_CONVERSATION = select(func.count()).where(
    MESSAGES.c.id == bindparam("p_id"), MESSAGES.c.conversation_id == bindparam("p_conversation_id")
)

OWNED_CONVERSATION = select(CONVERSATIONS.c.id).where(
    CONVERSATIONS.c.id == bindparam("o_id"), CONVERSATIONS.c.user_id == bindparam("o_user_id")
)


def _message_page(newest_first: bool, after_cursor: bool) -> Select:
    """One page of a conversation's messages in pk order; with a cursor, only those past it."""
    pk = MESSAGES.c.pk
    query = select(MESSAGES).where(MESSAGES.c.conversation_id == bindparam("m_conversation_id"))
    if after_cursor:
        query = query.where(pk < bindparam("m_after_pk") if newest_first else pk > bindparam("m_after_pk"))
    return query.order_by(pk.desc() if newest_first else pk).limit(bindparam("m_limit"))


# By (newest_first, has a cursor).
MESSAGE_PAGES = {
    (newest_first, after_cursor): _message_page(newest_first, after_cursor)
    for newest_first in (False, True)
    for after_cursor in (False, True)
}


def _usage_upsert(dialect_insert: Callable[..., Insert]) -> Insert:
    """Add an assistant message to its user's daily usage: an upsert, so concurrent turns both count."""
    statement = dialect_insert(USAGE_DAILY)
    return statement.on_conflict_do_update(
        index_elements=[USAGE_DAILY.c.user_id, USAGE_DAILY.c.day, USAGE_DAILY.c.model],
        set_={
            USAGE_DAILY.c.prompt_tokens: USAGE_DAILY.c.prompt_tokens + statement.excluded.prompt_tokens,
            USAGE_DAILY.c.completion_tokens: USAGE_DAILY.c.completion_tokens + statement.excluded.completion_tokens,
            USAGE_DAILY.c.messages: USAGE_DAILY.c.messages + statement.excluded.messages,
        },
    )


USAGE_UPSERTS = {"postgresql": _usage_upsert(postgresql.insert), "sqlite": _usage_upsert(sqlite.insert)}


async def _bump_conversation(connection: AsyncConnection, user_id: str, conversation_id: str, now: datetime) -> int:
    """Count one more message and touch updated_at; the new count, or NotFound when not the user's."""
    result = await connection.execute(BUMP_CONVERSATION, {"b_id": conversation_id, "b_user_id": user_id, "b_now": now})
    count = result.scalar()
    if count is None:
        raise _conversation_not_found()
    return count


async def _require_message_in(connection: AsyncConnection, conversation_id: str, message_id: str) -> None:
    parameters = {"p_id": message_id, "p_conversation_id": conversation_id}
    result = await connection.execute(PARENT_IN_CONVERSATION, parameters)
    if not result.scalar():
        raise InvalidArgument("parent_message_id is not a message of this conversation")


def _message_values(conversation_id: str, new: NewMessage, now: datetime) -> dict:
    """A new message's columns, named as in the table (and as in Message)."""
    return {
        "id": str(uuid.uuid4()),
        "conversation_id": conversation_id,
        "parent_message_id": new.parent_message_id,
        "role": new.role,
        "content": new.content,
        "status": new.status,
        "client_message_id": new.client_message_id,
        "model": new.model,
        "prompt_tokens": new.prompt_tokens,
        "completion_tokens": new.completion_tokens,
        "created_at": now,
        "tool_calls_json": new.tool_calls_json,
        "tool_call_id": new.tool_call_id,
        "tool_name": new.tool_name,
    }


def _usage_values(user_id: str, message: dict) -> dict:
    return {
        "user_id": user_id,
        "day": message["created_at"].astimezone(UTC).date(),
        "model": message["model"],
        "prompt_tokens": message["prompt_tokens"],
        "completion_tokens": message["completion_tokens"],
        "messages": 1,
    }


def to_conversation(row: ConversationRow) -> Conversation:
    return Conversation(
        id=row.id,
        user_id=row.user_id,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=row.message_count,
    )


def to_message(row: MessageRow) -> Message:
    return Message(
        pk=row.pk,
        id=row.id,
        conversation_id=row.conversation_id,
        parent_message_id=row.parent_message_id,
        role=row.role,
        content=row.content,
        status=row.status,
        client_message_id=row.client_message_id,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        created_at=row.created_at,
        tool_calls_json=row.tool_calls_json,
        tool_call_id=row.tool_call_id,
        tool_name=row.tool_name,
    )
