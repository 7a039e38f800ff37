"""Cancel requests (RequestCancel, WatchCancels, BeginTurn's cancel_requested) through the real server,
on both backends: a turn can be stopped from any gateway replica, not only the one running it."""

import asyncio

import grpc

from duplex.session.v1 import session_pb2
from tests.session_service.rpc_helpers import (
    CALL_TIMEOUT,
    OWNER,
    STRANGER,
    end_turn,
    expect_status,
    open_session,
)

GATEWAY_A, GATEWAY_B = "gateway-a", "gateway-b"


async def begin(stub, session_id: str, turn_id: str, owner: str = GATEWAY_A) -> session_pb2.BeginTurnResponse:
    request = session_pb2.BeginTurnRequest(user_id=OWNER, session_id=session_id, turn_id=turn_id, owner=owner)
    return await stub.BeginTurn(request, timeout=CALL_TIMEOUT)


async def request_cancel(stub, session_id: str, turn_id: str = "", user_id: str = OWNER, **fields) -> str:
    request = session_pb2.RequestCancelRequest(user_id=user_id, session_id=session_id, turn_id=turn_id, **fields)
    return (await stub.RequestCancel(request, timeout=CALL_TIMEOUT)).turn_id


class Watcher:
    """One gateway's WatchCancels stream, collected in the background."""

    def __init__(self, stub, owner: str):
        self.call = stub.WatchCancels(session_pb2.WatchCancelsRequest(owner=owner))
        self.received: asyncio.Queue[session_pb2.CancelRequested] = asyncio.Queue()
        self.in_place = asyncio.Event()  # the first response, which carries no cancel, arrived
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for response in self.call:
            if not response.HasField("cancel"):
                self.in_place.set()
                continue
            await self.received.put(response.cancel)

    async def next(self, timeout: float = 3.0) -> session_pb2.CancelRequested:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def watching(stub, owner: str) -> Watcher:
    watcher = Watcher(stub, owner)
    # Requests are not replayed: the watch must be in place before the requests these tests make.
    await asyncio.wait_for(watcher.in_place.wait(), 3.0)
    return watcher


async def test_a_cancel_request_reaches_the_owner_of_the_running_turn_at_once(stub):
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    owner, other = await watching(stub, GATEWAY_A), await watching(stub, GATEWAY_B)
    try:
        assert await request_cancel(stub, session_id) == "t1"  # empty turn_id: whichever runs
        received = await owner.next()
        assert (received.session_id, received.turn_id, received.interrupt) == (session_id, "t1", False)
        assert other.received.empty()  # only the owner hears of it
    finally:
        await owner.close()
        await other.close()


async def test_an_interrupt_carries_what_was_played(stub):
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    owner = await watching(stub, GATEWAY_A)
    try:
        assert await request_cancel(stub, session_id, "t1", interrupt=True, played_ms=1234) == "t1"
        received = await owner.next()
        assert (received.turn_id, received.interrupt, received.played_ms) == ("t1", True, 1234)
    finally:
        await owner.close()


async def test_the_request_is_recorded_so_a_renewal_reports_it(stub):
    # An owner whose watch was down when the request was made learns of it when it renews its lease.
    session_id = (await open_session(stub)).session_id
    assert not (await begin(stub, session_id, "t1")).HasField("cancel_requested")
    await request_cancel(stub, session_id, "t1", interrupt=True, played_ms=50)
    renewed = await begin(stub, session_id, "t1")
    assert renewed.cancel_requested == session_pb2.CancelRequested(
        session_id=session_id, turn_id="t1", interrupt=True, played_ms=50
    )
    # The next turn starts with a clean slate.
    await end_turn(stub, session_id, "t1")
    assert not (await begin(stub, session_id, "t2")).HasField("cancel_requested")
    assert not (await begin(stub, session_id, "t2")).HasField("cancel_requested")


async def test_nothing_is_asked_when_no_turn_or_another_turn_runs(stub):
    session_id = (await open_session(stub)).session_id
    owner = await watching(stub, GATEWAY_A)
    try:
        assert await request_cancel(stub, session_id) == ""  # no turn yet
        await begin(stub, session_id, "t1")
        assert await request_cancel(stub, session_id, "t0") == ""  # a turn that is not the running one
        await end_turn(stub, session_id, "t1")
        assert await request_cancel(stub, session_id, "t1") == ""  # ended
        await asyncio.sleep(0.2)
        assert owner.received.empty()
    finally:
        await owner.close()


async def test_only_the_owner_of_the_session_may_cancel(stub):
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    await expect_status(grpc.StatusCode.NOT_FOUND, request_cancel(stub, session_id, user_id=STRANGER))
    await expect_status(grpc.StatusCode.NOT_FOUND, request_cancel(stub, "no-such-session"))
    assert not (await begin(stub, session_id, "t1")).HasField("cancel_requested")


async def test_watching_needs_an_owner(stub):
    watcher = Watcher(stub, "")
    try:
        await expect_status(grpc.StatusCode.INVALID_ARGUMENT, watcher.call.read())
    finally:
        await watcher.close()
