"""Closed and expired sessions are recorded with history_service, on both backends, retried until they are."""

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duplex.session.v1 import session_pb2
from session_service.session_end import Housekeeper
from tests.session_service.rpc_helpers import CALL_TIMEOUT, OWNER, get_session, open_session

# Long enough for a duplicate delivery to show up if there were one.
SETTLE_SECONDS = 0.5


async def close(stub, session_id: str) -> None:
    request = session_pb2.CloseSessionRequest(user_id=OWNER, session_id=session_id)
    await stub.CloseSession(request, timeout=CALL_TIMEOUT)


async def test_a_closed_session_is_recorded_once(start_service, start_history):
    history = await start_history()
    stub = (await start_service(history_target=history.target)).stub
    session = await open_session(stub, conversation_id="c1")
    before_close = time.time()
    await close(stub, session.session_id)

    await history.wait_for_records(1)
    await asyncio.sleep(SETTLE_SECONDS)
    [record] = history.recorded
    assert (record.user_id, record.session_id, record.conversation_id) == (OWNER, session.session_id, "c1")
    assert record.started_at.ToMilliseconds() == session.created_at.ToMilliseconds()
    assert record.ended_at.ToSeconds() >= int(before_close) - 1
    assert record.ended_at.ToNanoseconds() <= time.time_ns()


async def test_an_expired_session_is_recorded_once_with_the_time_it_expired(start_service, start_history):
    history = await start_history()
    stub = (await start_service(history_target=history.target, session_ttl_seconds=0.3)).stub
    session = await open_session(stub, conversation_id="c1")

    await history.wait_for_records(1)
    await asyncio.sleep(SETTLE_SECONDS)
    [record] = history.recorded
    assert record.session_id == session.session_id
    assert record.ended_at.ToMilliseconds() == pytest.approx(session.expires_at.ToMilliseconds(), abs=1)


async def test_a_failed_recording_is_retried_until_it_succeeds(start_service, start_history):
    history = await start_history(failures=2)
    stub = (await start_service(history_target=history.target, session_end_retry_seconds=0.05)).stub
    session_id = (await open_session(stub)).session_id
    await close(stub, session_id)

    await history.wait_for_records(1)
    await asyncio.sleep(SETTLE_SECONDS)
    assert [attempt.session_id for attempt in history.attempts] == [session_id] * 3
    assert history.recorded_sessions() == [session_id]


async def test_a_recording_history_refuses_for_good_is_not_retried(start_service, start_history):
    # NOT_FOUND: the conversation was deleted before the session ended; retrying can never succeed.
    history = await start_history(failures=1, failure_code=grpc.StatusCode.NOT_FOUND)
    stub = (await start_service(history_target=history.target, session_end_retry_seconds=0.05)).stub
    session_id = (await open_session(stub)).session_id
    await close(stub, session_id)

    await asyncio.sleep(SETTLE_SECONDS)
    assert [attempt.session_id for attempt in history.attempts] == [session_id]
    assert history.recorded_sessions() == []


async def test_history_being_down_does_not_stop_serving(start_service, start_history):
    history = await start_history(failures=10**6)
    service = await start_service(history_target=history.target, session_end_retry_seconds=0.05)
    health = health_pb2_grpc.HealthStub(service.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    session_id = (await open_session(service.stub)).session_id
    await close(service.stub, session_id)
    await asyncio.sleep(0.3)
    assert len(history.attempts) >= 2  # still trying, with backoff
    assert len(history.attempts) < 10  # but not in a tight loop
    with pytest.raises(grpc.aio.AioRpcError):
        await get_session(service.stub, session_id)



async def test_a_housekeeper_stops_even_when_a_cancel_goes_missing():
    swallowed = []

    async def work() -> float:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)  # as Python 3.11's wait_for can: the first cancel is lost
        return 0.0

    keeper = Housekeeper("test-housekeeper", work, interval=10)
    keeper.start()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(keeper.stop(), 5)
    assert swallowed
