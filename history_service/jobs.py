"""A durable job queue in the history database, and the worker that runs it.

Jobs are rows. A worker claims one by setting status=running with a lease (locked_by, locked_until);
any number of workers, in this process or other replicas, can claim concurrently without running a job
twice: PostgreSQL hands each worker a different row with SELECT ... FOR UPDATE SKIP LOCKED, SQLite takes
its single write lock for the claiming UPDATE. A worker that dies leaves its lease to expire, and the job
is claimed again. Failures are retried with exponential backoff up to a maximum number of attempts, then
the job is failed and its handler told to give up. Running a job twice remains possible (a lease that
expires mid-run), so handlers must be idempotent.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from history_service.domain import Job, JobStatus
from history_service.models import JobRow
from history_service.repository import Clock, dialect_name, utc_now

log = logging.getLogger(__name__)

MAX_RETRY_DELAY = timedelta(hours=1)
MAX_ERROR_CHARS = 2000
# A job must end well inside its lease, or another worker would claim it while it still runs.
RUN_TIME_SHARE_OF_LEASE = 0.8
DUE_MARGIN_SECONDS = 0.005

FailureHook = Callable[[AsyncSession], Awaitable[None]]


class JobHandler(Protocol):
    async def run(self, payload: dict[str, Any]) -> None:
        """Do the work; raise to have it retried. Must be safe to run more than once."""

    async def give_up(self, session: AsyncSession, payload: dict[str, Any]) -> None:
        """Record that the work will never be done, in the transaction that fails the job."""


def new_job(kind: str, payload: dict[str, Any], now: datetime) -> JobRow:
    """A queued job, due at once; add it to the session that makes the work necessary."""
    return JobRow(
        kind=kind, payload=payload, status=JobStatus.QUEUED, attempts=0, run_after=now, created_at=now, updated_at=now
    )


def retry_delay(attempts: int, first_delay: timedelta) -> timedelta:
    """first_delay after the first failed attempt, doubling after each further one, at most an hour."""
    # The exponent is bounded so a huge max_attempts cannot overflow timedelta.
    doublings = min(max(attempts - 1, 0), 32)
    return min(first_delay * 2**doublings, MAX_RETRY_DELAY)


class JobQueue:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, clock: Clock = utc_now):
        self._sessionmaker = sessionmaker
        self._clock = clock

    async def claim(self, worker_id: str, lease: timedelta) -> Job | None:
        """Take the oldest due job (queued and due, or running under an expired lease), or None."""
        async with self._sessionmaker() as session:
            claim = _claim_postgresql if dialect_name(session) == "postgresql" else _claim_sqlite
            row = await claim(session, worker_id, self._clock(), lease)
            await session.commit()
        return _to_job(row) if row is not None else None

    async def seconds_until_next_due(self) -> float | None:
        """How long until a queued job comes due or a lease expires; None when nothing is waiting."""
        next_run = select(func.min(JobRow.run_after)).where(JobRow.status == JobStatus.QUEUED).scalar_subquery()
        next_expiry = select(func.min(JobRow.locked_until)).where(JobRow.status == JobStatus.RUNNING).scalar_subquery()
        async with self._sessionmaker() as session:
            moments = (await session.execute(select(next_run, next_expiry))).one()
        upcoming = [moment for moment in moments if moment is not None]
        if not upcoming:
            return None
        return max(0.0, (min(upcoming) - self._clock()).total_seconds())

    async def complete(self, job: Job, worker_id: str) -> bool:
        return await self._finish(job, worker_id, status=JobStatus.DONE, last_error=None)

    async def retry_later(self, job: Job, worker_id: str, error: str, delay: timedelta) -> bool:
        return await self._finish(
            job, worker_id, status=JobStatus.QUEUED, run_after=self._clock() + delay, last_error=error
        )

    async def fail(self, job: Job, worker_id: str, error: str, on_failed: FailureHook) -> bool:
        return await self._finish(job, worker_id, status=JobStatus.FAILED, last_error=error, on_finished=on_failed)

    async def release(self, job: Job, worker_id: str) -> bool:
        """Hand an unfinished job back at once (shutdown); the interrupted run does not count as an attempt."""
        return await self._finish(
            job, worker_id, status=JobStatus.QUEUED, run_after=self._clock(), attempts=JobRow.attempts - 1
        )

    async def _finish(self, job: Job, worker_id: str, *, on_finished: FailureHook | None = None, **values: Any) -> bool:
        """Apply `values` if this worker still holds the job; False when its lease went to another worker."""
        statement = (
            update(JobRow)
            .where(JobRow.id == job.id, JobRow.status == JobStatus.RUNNING, JobRow.locked_by == worker_id)
            .values(locked_by=None, locked_until=None, updated_at=self._clock(), **values)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session:
            held = (await session.execute(statement)).rowcount == 1
            if held and on_finished is not None:
                await on_finished(session)
            await session.commit()
        if not held:
            log.warning("job %d (%s): lease lost to another worker before it finished", job.id, job.kind)
        return held


def _due(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(JobRow.status == JobStatus.QUEUED, JobRow.run_after <= now),
        and_(JobRow.status == JobStatus.RUNNING, JobRow.locked_until < now),
    )


def _lease_values(worker_id: str, now: datetime, lease: timedelta) -> dict[str, Any]:
    return {
        "status": JobStatus.RUNNING,
        "attempts": JobRow.attempts + 1,
        "locked_by": worker_id,
        "locked_until": now + lease,
        "updated_at": now,
    }


async def _claim_postgresql(session: AsyncSession, worker_id: str, now: datetime, lease: timedelta) -> JobRow | None:
    # SKIP LOCKED: concurrent claimers pass over the row another one is taking instead of queueing behind
    # it, and the row lock holds until this transaction has marked the row as ours.
    candidate = await session.scalar(
        select(JobRow.id)
        .where(_due(now))
        .order_by(JobRow.run_after, JobRow.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if candidate is None:
        return None
    return await session.scalar(
        update(JobRow).where(JobRow.id == candidate).values(_lease_values(worker_id, now, lease)).returning(JobRow)
    )


async def _claim_sqlite(session: AsyncSession, worker_id: str, now: datetime, lease: timedelta) -> JobRow | None:
    # One statement: SQLite runs one writer at a time, so choosing and marking the job cannot interleave
    # with another claim. The repeated _due guards the row anyway.
    oldest_due = select(JobRow.id).where(_due(now)).order_by(JobRow.run_after, JobRow.id).limit(1).scalar_subquery()
    return await session.scalar(
        update(JobRow)
        .where(JobRow.id == oldest_due, _due(now))
        .values(_lease_values(worker_id, now, lease))
        .returning(JobRow)
    )


def _to_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        payload=dict(row.payload),
        attempts=row.attempts,
        locked_by=row.locked_by,
        locked_until=row.locked_until,
        last_error=row.last_error,
    )


class JobWorker:
    """Claims and runs jobs until stopped: a background task owned by the server."""

    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[str, JobHandler],
        *,
        worker_id: str,
        poll_interval: float,
        lease: timedelta,
        max_attempts: int,
        first_retry_delay: timedelta,
    ):
        self.worker_id = worker_id
        self._queue = queue
        self._handlers = dict(handlers)
        self._poll_interval = poll_interval
        self._lease = lease
        self._max_attempts = max_attempts
        self._first_retry_delay = first_retry_delay
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"job-worker {self.worker_id}")

    async def stop(self) -> None:
        """Cancel the loop and wait for it; a job cut short is handed back to the queue."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def poke(self) -> None:
        """Look for work now rather than at the next poll (after this process queued a job)."""
        self._wake.set()

    async def run_once(self) -> bool:
        """Claim and run one job; False when none was due."""
        job = await self._queue.claim(self.worker_id, self._lease)
        if job is None:
            return False
        await self._process(job)
        return True

    async def _run(self) -> None:
        while True:
            # Cleared before looking, so a poke that arrives while looking is not lost.
            self._wake.clear()
            try:
                if await self.run_once():
                    continue
                pause = await self._pause_before_next_look()
            except Exception:
                log.exception("job worker %s: looking for jobs failed", self.worker_id)
                pause = self._poll_interval
            await self._sleep_until_poked(pause)

    async def _pause_before_next_look(self) -> float:
        """Until the next poll, or sooner when a retry comes due or a lease expires before it."""
        due_in = await self._queue.seconds_until_next_due()
        if due_in is None:
            return self._poll_interval
        # The margin covers the event loop's clock and the database's wall clock disagreeing slightly: waking
        # a hair early would find nothing and, without it, loop once more for nothing.
        return min(self._poll_interval, due_in + DUE_MARGIN_SECONDS)

    async def _sleep_until_poked(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _process(self, job: Job) -> None:
        handler = self._handlers.get(job.kind)
        if handler is None:
            await self._queue.fail(job, self.worker_id, f"no handler for job kind {job.kind!r}", _nothing_to_record)
            return
        if job.attempts > self._max_attempts:
            # Its earlier runs ended without a verdict: the worker running it died (or it kept killing them).
            await self._give_up(job, handler, "its worker stopped before it finished, too many times")
            return
        try:
            async with asyncio.timeout(self._lease.total_seconds() * RUN_TIME_SHARE_OF_LEASE):
                await handler.run(job.payload)
        except asyncio.CancelledError:
            await self._release(job)
            raise
        except Exception as error:
            await self._after_failure(job, handler, error)
        else:
            await self._queue.complete(job, self.worker_id)

    async def _after_failure(self, job: Job, handler: JobHandler, error: Exception) -> None:
        description = (f"{type(error).__name__}: {error}")[:MAX_ERROR_CHARS]
        log.warning(
            "job %d (%s) attempt %d/%d failed: %s", job.id, job.kind, job.attempts, self._max_attempts, description
        )
        if job.attempts >= self._max_attempts:
            await self._give_up(job, handler, description)
        else:
            delay = retry_delay(job.attempts, self._first_retry_delay)
            await self._queue.retry_later(job, self.worker_id, description, delay)

    async def _give_up(self, job: Job, handler: JobHandler, reason: str) -> None:
        log.error("job %d (%s) failed for good after %d attempts: %s", job.id, job.kind, job.attempts, reason)

        async def record_failure(session: AsyncSession) -> None:
            await handler.give_up(session, job.payload)

        await self._queue.fail(job, self.worker_id, reason, record_failure)

    async def _release(self, job: Job) -> None:
        try:
            await self._queue.release(job, self.worker_id)
        except Exception:
            # Not fatal: the lease expires and another worker claims the job then.
            log.warning("job %d (%s): could not hand it back while stopping", job.id, job.kind, exc_info=True)


async def _nothing_to_record(_session: AsyncSession) -> None:
    return None
