"""AppendEventBatches through the real server, on both backends: several sessions' appends in one call,
each refused or done on its own, with AppendEvents' effects (leases, followers)."""

import asyncio
import uuid

import grpc

from duplex.session.v1 import session_pb2
from session_service.servicer import MAX_APPEND_BATCH_EVENTS, MAX_APPEND_BATCHES
from tests.session_service.rpc_helpers import (
    append,
    append_batches,
    batch,
    begin_turn,
    end_turn,
    expect_status,
    get_session,
    log_event,
    open_session,
    read_batches,
    read_request,
    read_seqs,
)


def error_of(result: session_pb2.AppendEventsResult) -> tuple[grpc.StatusCode, str]:
    assert result.WhichOneof("outcome") == "error", result
    code = next(code for code in grpc.StatusCode if code.value[0] == result.error.code)
    return code, result.error.message


async def test_one_call_appends_to_several_sessions(stub):
    first, second = [(await open_session(stub)).session_id for _ in range(2)]
    await append(stub, second, [1])

    results = await append_batches(stub, batch(first, [1, 2, 3]), batch(second, [2, 3]))

    assert [result.last_seq for result in results] == [3, 3]
    events = [event for reply in await read_batches(stub, read_request(first)) for event in reply]
    assert events == [log_event(1), log_event(2), log_event(3)]
    assert await read_seqs(stub, read_request(second)) == [1, 2, 3]


async def test_a_refused_batch_changes_nothing_and_does_not_stop_the_others(stub):
    gapped, fine, emptied = [(await open_session(stub)).session_id for _ in range(3)]
    unknown = uuid.uuid4().hex  # shaped like a real id, but no such session
    await append(stub, gapped, [1])

    results = await append_batches(
        stub,
        batch(gapped, [3, 4]),
        batch(unknown, [1]),
        batch(fine, [1, 2]),
        batch("not-a-session-id", [1]),
        batch(emptied, []),
    )

    assert len(results) == 5
    code, message = error_of(results[0])
    assert code == grpc.StatusCode.ABORTED and "expected seq 2" in message and "got 3" in message
    assert error_of(results[1]) == (grpc.StatusCode.NOT_FOUND, f"session {unknown} not found")
    assert results[2].WhichOneof("outcome") == "last_seq" and results[2].last_seq == 2
    assert error_of(results[3])[0] == grpc.StatusCode.NOT_FOUND
    assert error_of(results[4])[0] == grpc.StatusCode.ABORTED
    assert (await get_session(stub, gapped)).last_seq == 1
    assert await read_seqs(stub, read_request(fine)) == [1, 2]
    # What AppendEvents would say to the same batch, word for word.
    error = await expect_status(grpc.StatusCode.ABORTED, append(stub, gapped, [3, 4]))
    assert error.details() == message


async def test_batches_apply_in_order_so_a_session_may_come_twice(stub):
    session_id = (await open_session(stub)).session_id
    results = await append_batches(
        stub, batch(session_id, [1, 2]), batch(session_id, [3]), batch(session_id, [3]), batch(session_id, [5])
    )
    # The second [3] is a retry of events the log holds by then: taken, once.
    assert [result.WhichOneof("outcome") for result in results] == ["last_seq", "last_seq", "last_seq", "error"]
    assert [result.last_seq for result in results[:3]] == [2, 3, 3]
    assert await read_seqs(stub, read_request(session_id)) == [1, 2, 3]


async def test_appending_in_batches_renews_every_session_s_turn_lease(start_service):
    stub = (await start_service(turn_lease_seconds=0.6)).stub
    sessions = [(await open_session(stub)).session_id for _ in range(2)]
    for session_id in sessions:
        await begin_turn(stub, session_id, "t1")
    for seq in (1, 2, 3):
        await asyncio.sleep(0.25)
        await append_batches(stub, *(batch(session_id, [seq]) for session_id in sessions))
    # 0.75 s after BeginTurn, but only moments after the last append.
    for session_id in sessions:
        await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "t2"))
        assert (await get_session(stub, session_id)).active_turn_id == "t1"


async def test_followers_of_every_session_in_the_call_are_woken(stub, followers):
    sessions = [(await open_session(stub)).session_id for _ in range(3)]
    for session_id in sessions:
        await begin_turn(stub, session_id, "t1")
    tails = [followers(stub, read_request(session_id, 0, follow=True)) for session_id in sessions]
    for tail in tails:
        await tail.assert_still_open()

    await append_batches(stub, *(batch(session_id, [1, 2]) for session_id in sessions))
    for tail in tails:
        await tail.wait_for_seq(2)
    await append_batches(stub, *(batch(session_id, [3]) for session_id in sessions))
    for session_id in sessions:
        await end_turn(stub, session_id, "t1")
    for tail in tails:
        assert await tail.wait_until_ended() == [1, 2, 3]


async def test_oversized_or_malformed_calls_are_refused_whole(stub):
    session_id = (await open_session(stub)).session_id

    too_many = [batch(session_id, [1])] + [batch(uuid.uuid4().hex, [1]) for _ in range(MAX_APPEND_BATCHES)]
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, append_batches(stub, *too_many))
    assert f"at most {MAX_APPEND_BATCHES} batches" in error.details()
    too_long = batch(session_id, range(1, MAX_APPEND_BATCH_EVENTS + 2))
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, append_batches(stub, too_long))
    assert f"at most {MAX_APPEND_BATCH_EVENTS} events" in error.details()
    unnamed = session_pb2.AppendEventsRequest(events=[log_event(2)])
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, append_batches(stub, batch(session_id, [1]), unnamed))
    assert (await get_session(stub, session_id)).last_seq == 0  # nothing of a refused call was appended

    # At the limits exactly, it goes through.
    at_limit = [batch(session_id, range(1, MAX_APPEND_BATCH_EVENTS - MAX_APPEND_BATCHES + 2))]
    at_limit += [batch(uuid.uuid4().hex, [1]) for _ in range(MAX_APPEND_BATCHES - 1)]
    results = await append_batches(stub, *at_limit)
    assert results[0].last_seq == MAX_APPEND_BATCH_EVENTS - MAX_APPEND_BATCHES + 1
    assert await append_batches(stub) == []
