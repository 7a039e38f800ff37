"""The job queue and worker against both backends: exclusive claims, leases, retries, shutdown."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from history_service.database import create_database_engine, create_sessionmaker
from history_service.domain import JobStatus
from history_service.jobs import JobQueue, JobWorker, new_job, retry_delay
from history_service.models import JobRow

KIND = "test_job"
LEASE = timedelta(seconds=30)


class RecordingHandler:
    """Remembers every run; fails the first `failures` runs; can hold a run until released."""

    def __init__(self, failures: int = 0, hold: bool = False):
        self.runs: list[Any] = []
        self.given_up: list[Any] = []
        self.failures = failures
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def run(self, payload: dict[str, Any]) -> None:
        self.runs.append(payload["n"])
        self.started.set()
        await self.release.wait()
        # A pause inside the run lets concurrent workers interleave.
        await asyncio.sleep(0.005)
        if len(self.runs) <= self.failures:
            raise RuntimeError(f"planned failure {len(self.runs)}")

    async def give_up(self, session: AsyncSession, payload: dict[str, Any]) -> None:
        self.given_up.append(payload["n"])


@pytest.fixture
async def sessionmaker(database_url, history_settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_database_engine(history_settings.effective_database_url())
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


async def enqueue(sessionmaker, count: int, **columns: Any) -> list[int]:
    now = datetime.now(UTC)
    rows = [new_job(KIND, {"n": n}, now) for n in range(count)]
    for row in rows:
        for name, value in columns.items():
            setattr(row, name, value)
    async with sessionmaker() as session:
        session.add_all(rows)
        await session.commit()
    return [row.id for row in rows]


async def job_rows(sessionmaker) -> list[JobRow]:
    async with sessionmaker() as session:
        return list((await session.scalars(select(JobRow).order_by(JobRow.id))).all())


def make_worker(sessionmaker, handler, worker_id: str = "worker-a", **options: Any) -> JobWorker:
    settings = {
        "poll_interval": 0.02,
        "lease": LEASE,
        "max_attempts": 3,
        "first_retry_delay": timedelta(milliseconds=1),
        **options,
    }
    return JobWorker(JobQueue(sessionmaker), {KIND: handler}, worker_id=worker_id, **settings)


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_concurrent_claims_never_hand_out_a_job_twice(sessionmaker):
    job_ids = await enqueue(sessionmaker, 20)
    queue = JobQueue(sessionmaker)

    async def claim_all(worker_id: str) -> list[int]:
        claimed = []
        while (job := await queue.claim(worker_id, LEASE)) is not None:
            claimed.append(job.id)
        return claimed

    per_claimer = await asyncio.gather(*(claim_all(f"claimer-{n}") for n in range(6)))

    every_claim = [job_id for claimed in per_claimer for job_id in claimed]
    assert sorted(every_claim) == job_ids
    assert all(row.status is JobStatus.RUNNING and row.attempts == 1 for row in await job_rows(sessionmaker))


async def test_two_workers_run_each_of_20_jobs_exactly_once(sessionmaker, history_settings):
    await enqueue(sessionmaker, 20)
    # The second worker has its own engine, as another replica would.
    other_engine = create_database_engine(history_settings.effective_database_url())
    handler = RecordingHandler()
    workers = [
        make_worker(sessionmaker, handler, "worker-a"),
        make_worker(create_sessionmaker(other_engine), handler, "worker-b"),
    ]
    try:
        for worker in workers:
            worker.start()

        async def all_done() -> bool:
            return all(row.status is JobStatus.DONE for row in await job_rows(sessionmaker))

        await until(all_done)
    finally:
        for worker in workers:
            await worker.stop()
        await other_engine.dispose()

    assert sorted(handler.runs) == list(range(20))
    assert all(row.attempts == 1 and row.locked_by is None for row in await job_rows(sessionmaker))


async def test_a_crashed_workers_expired_lease_is_claimed_again(sessionmaker):
    now = datetime.now(UTC)
    [expired] = await enqueue(
        sessionmaker,
        1,
        status=JobStatus.RUNNING,
        attempts=1,
        locked_by="crashed",
        locked_until=now - timedelta(seconds=1),
    )
    await enqueue(
        sessionmaker, 1, status=JobStatus.RUNNING, attempts=1, locked_by="alive", locked_until=now + timedelta(hours=1)
    )
    handler = RecordingHandler()
    worker = make_worker(sessionmaker, handler)

    assert await worker.run_once()
    assert not await worker.run_once()  # the live lease is left alone

    rows = await job_rows(sessionmaker)
    assert (rows[0].id, rows[0].status, rows[0].attempts) == (expired, JobStatus.DONE, 2)
    assert (rows[1].status, rows[1].locked_by) == (JobStatus.RUNNING, "alive")
    assert handler.runs == [0]


async def test_failures_are_retried_with_backoff_then_the_job_fails(sessionmaker):
    await enqueue(sessionmaker, 1)
    handler = RecordingHandler(failures=10)
    worker = make_worker(sessionmaker, handler, first_retry_delay=timedelta(milliseconds=50))

    assert await worker.run_once()
    [row] = await job_rows(sessionmaker)
    assert (row.status, row.attempts, row.locked_by) == (JobStatus.QUEUED, 1, None)
    assert "planned failure 1" in row.last_error
    # run_after is "now + 50 ms" taken just before the row is written; allow a loaded machine some slack.
    assert row.run_after >= row.updated_at + timedelta(milliseconds=25)
    assert not await worker.run_once()  # not due yet

    for _ in range(2):
        await until(worker.run_once)

    [row] = await job_rows(sessionmaker)
    assert (row.status, row.attempts) == (JobStatus.FAILED, 3)
    assert "planned failure 3" in row.last_error
    assert handler.runs == [0, 0, 0]
    assert handler.given_up == [0]
    assert not await worker.run_once()


async def test_a_job_whose_workers_kept_dying_fails_without_running_again(sessionmaker):
    expired = datetime.now(UTC) - timedelta(seconds=1)
    await enqueue(sessionmaker, 1, status=JobStatus.RUNNING, attempts=3, locked_by="crashed", locked_until=expired)
    handler = RecordingHandler()

    assert await make_worker(sessionmaker, handler, max_attempts=3).run_once()

    [row] = await job_rows(sessionmaker)
    assert (row.status, row.attempts) == (JobStatus.FAILED, 4)
    assert handler.runs == []
    assert handler.given_up == [0]


async def test_a_job_of_unknown_kind_fails(sessionmaker):
    await enqueue(sessionmaker, 1, kind="mystery")

    assert await make_worker(sessionmaker, RecordingHandler()).run_once()

    [row] = await job_rows(sessionmaker)
    assert row.status is JobStatus.FAILED
    assert "mystery" in row.last_error


async def test_stopping_hands_a_running_job_back(sessionmaker):
    await enqueue(sessionmaker, 1)
    handler = RecordingHandler(hold=True)
    worker = make_worker(sessionmaker, handler)
    worker.start()
    await asyncio.wait_for(handler.started.wait(), 10)

    await worker.stop()

    [row] = await job_rows(sessionmaker)
    assert (row.status, row.attempts, row.locked_by, row.locked_until) == (JobStatus.QUEUED, 0, None, None)


async def test_a_poke_wakes_a_sleeping_worker(sessionmaker):
    handler = RecordingHandler()
    worker = make_worker(sessionmaker, handler, poll_interval=60)
    worker.start()
    try:
        await asyncio.sleep(0.1)  # the worker found nothing and sleeps for a minute
        await enqueue(sessionmaker, 1)
        worker.poke()
        await asyncio.wait_for(handler.started.wait(), 5)
    finally:
        await worker.stop()


def test_retry_delays_double_up_to_an_hour():
    first = timedelta(seconds=10)
    assert [retry_delay(n, first).total_seconds() for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert retry_delay(50, first) == timedelta(hours=1)
