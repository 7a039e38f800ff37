"""Conversations and messages in SQL, per user. Plain async methods in, domain dataclasses out.

A conversation that does not exist, belongs to someone else or has a malformed id is NotFound:
callers cannot tell these apart, so nobody learns that another user's conversation exists.
"""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from duplex.common.errors import NotFound
from history_service.domain import (
    AppendResult,
    Conversation,
    ConversationCursor,
    ConversationPage,
    Message,
    MessagePage,
    NewMessage,
)
from history_service.models import ConversationRow, MessageRow

Clock = Callable[[], datetime]


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


class HistoryRepository:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, clock: Clock = utc_now):
        self._sessionmaker = sessionmaker
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
        return _to_conversation(row)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Conversation:
        async with self._sessionmaker() as session:
            row = await self._owned_conversation(session, user_id, conversation_id)
            return _to_conversation(row)

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
        conversations = [_to_conversation(row) for row in rows[:limit]]
        has_more = len(rows) > limit
        next_cursor = ConversationCursor(conversations[-1].updated_at, conversations[-1].id) if has_more else None
        return ConversationPage(conversations, next_cursor)

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
            return AppendResult(await self._insert_message(user_id, conversation_id, new), duplicate=False)
        except IntegrityError:
            if new.client_message_id is None:
                raise
            original = await self._find_by_client_message_id(user_id, conversation_id, new.client_message_id)
            if original is None:
                raise
            return AppendResult(original, duplicate=True)

    async def list_messages(
        self, user_id: str, conversation_id: str, limit: int, after_pk: int | None = None
    ) -> MessagePage:
        """Oldest first, in insertion order."""
        _require_positive(limit)
        query = select(MessageRow).order_by(MessageRow.pk).limit(limit + 1)
        if after_pk is not None:
            query = query.where(MessageRow.pk > after_pk)
        async with self._sessionmaker() as session:
            conversation = await self._owned_conversation(session, user_id, conversation_id)
            rows = (await session.scalars(query.where(MessageRow.conversation_id == conversation.id))).all()
        messages = [_to_message(row) for row in rows[:limit]]
        has_more = len(rows) > limit
        return MessagePage(messages, messages[-1].pk if has_more else None)

    async def _insert_message(self, user_id: str, conversation_id: str, new: NewMessage) -> Message:
        now = self._clock()
        async with self._sessionmaker() as session:
            # Write to the conversation first: it checks ownership and takes the write lock (a row lock
            # on PostgreSQL, the database lock on SQLite) before anything is read, so concurrent appends
            # queue up here instead of failing to upgrade a read transaction.
            bumped = await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id, ConversationRow.user_id == user_id)
                .values(updated_at=now, message_count=ConversationRow.message_count + 1)
                .execution_options(synchronize_session=False)
            )
            if bumped.rowcount == 0:
                raise _conversation_not_found()
            row = _new_message_row(conversation_id, new, now)
            session.add(row)
            await session.commit()
        return _to_message(row)

    async def _find_by_client_message_id(
        self, user_id: str, conversation_id: str, client_message_id: str
    ) -> Message | None:
        query = (
            select(MessageRow)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .where(
                ConversationRow.user_id == user_id,
                MessageRow.conversation_id == conversation_id,
                MessageRow.client_message_id == client_message_id,
            )
        )
        async with self._sessionmaker() as session:
            row = await session.scalar(query)
        return _to_message(row) if row is not None else None

    @staticmethod
    async def _owned_conversation(session: AsyncSession, user_id: str, conversation_id: str) -> ConversationRow:
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


def _new_message_row(conversation_id: str, new: NewMessage, now: datetime) -> MessageRow:
    return MessageRow(
        id=str(uuid.uuid4()),
        conversation_id=conversation_id,
        parent_message_id=new.parent_message_id,
        role=new.role,
        content=new.content,
        status=new.status,
        client_message_id=new.client_message_id,
        model=new.model,
        prompt_tokens=new.prompt_tokens,
        completion_tokens=new.completion_tokens,
        created_at=now,
    )


def _to_conversation(row: ConversationRow) -> Conversation:
    return Conversation(
        id=row.id,
        user_id=row.user_id,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=row.message_count,
    )


def _to_message(row: MessageRow) -> Message:
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
    )
