"""Finished sessions: the record RecordSessionEnd writes, and its summary's progress."""

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Insert, Update, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from history_service.domain import SessionEnd, SessionRecord, SessionRecordStatus
from history_service.jobs import new_job
from history_service.models import SessionRecordRow
from history_service.repository import Clock, dialect_name, owned_conversation, utc_now

SUMMARIZE_SESSION = "summarize_session"
MILLISECOND = timedelta(milliseconds=1)


class SessionRecords:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, clock: Clock = utc_now):
        self._sessionmaker = sessionmaker
        self._clock = clock

    async def record_end(self, end: SessionEnd) -> bool:
        """Store the record and queue its summary job, together or not at all.

        Returns False when the session was already recorded: then nothing changes, not even when the
        second report differs, so retries and races between reporters are harmless.
        """
        async with self._sessionmaker() as session:
            conversation = await owned_conversation(session, end.user_id, end.conversation_id)
            statement = _insert_if_new(dialect_name(session), self._new_record(end, conversation.id))
            recorded = (await session.execute(statement)).rowcount == 1
            if recorded:
                session.add(new_job(SUMMARIZE_SESSION, {"session_id": end.session_id}, self._clock()))
            await session.commit()
        return recorded

    async def list_for_conversation(self, user_id: str, conversation_id: str) -> list[SessionRecord]:
        """Newest first."""
        async with self._sessionmaker() as session:
            conversation = await owned_conversation(session, user_id, conversation_id)
            query = (
                select(SessionRecordRow)
                .where(SessionRecordRow.conversation_id == conversation.id)
                .order_by(SessionRecordRow.ended_at.desc(), SessionRecordRow.session_id.desc())
            )
            rows = (await session.scalars(query)).all()
        return [_to_record(row) for row in rows]

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._sessionmaker() as session:
            row = await session.get(SessionRecordRow, session_id)
        return _to_record(row) if row is not None else None

    async def write_summary(self, session_id: str, summary: str) -> None:
        async with self._sessionmaker() as session:
            await session.execute(
                _set_status(session_id, SessionRecordStatus.DONE, self._clock()).values(summary=summary)
            )
            await session.commit()

    async def mark_failed(self, session: AsyncSession, session_id: str) -> None:
        """In the caller's transaction: the one that fails the summary job."""
        await session.execute(_set_status(session_id, SessionRecordStatus.FAILED, self._clock()))

    def _new_record(self, end: SessionEnd, conversation_id: str) -> dict[str, Any]:
        now = self._clock()
        return {
            "session_id": end.session_id,
            "user_id": end.user_id,
            "conversation_id": conversation_id,
            "started_at": end.started_at,
            "ended_at": end.ended_at,
            "duration_ms": (end.ended_at - end.started_at) // MILLISECOND,
            "summary": "",
            "status": SessionRecordStatus.PENDING,
            "created_at": now,
            "updated_at": now,
        }


def _insert_if_new(dialect: str, values: dict[str, Any]) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(SessionRecordRow).values(values).on_conflict_do_nothing(index_elements=[SessionRecordRow.session_id])


def _set_status(session_id: str, status: SessionRecordStatus, now: datetime) -> Update:
    # Only a pending record moves: a late duplicate run of the job cannot undo a verdict.
    return (
        update(SessionRecordRow)
        .where(SessionRecordRow.session_id == session_id, SessionRecordRow.status == SessionRecordStatus.PENDING)
        .values(status=status, updated_at=now)
        .execution_options(synchronize_session=False)
    )


def _to_record(row: SessionRecordRow) -> SessionRecord:
    return SessionRecord(
        session_id=row.session_id,
        user_id=row.user_id,
        conversation_id=row.conversation_id,
        started_at=row.started_at,
        ended_at=row.ended_at,
        duration=timedelta(milliseconds=row.duration_ms),
        summary=row.summary,
        status=row.status,
    )
