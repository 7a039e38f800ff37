"""Helpers for talking to a real SessionService in tests: requests, stream readers, status checks."""

import asyncio

import grpc
import pytest

from duplex.session.v1 import session_pb2

OWNER = "alice"
STRANGER = "mallory"
CALL_TIMEOUT = 5.0
STREAM_TIMEOUT = 3.0


def log_event(seq: int, turn_id: str = "t1", *, terminal: bool = False) -> session_pb2.LogEvent:
    # Non-UTF-8 bytes on purpose: the payload must travel as opaque bytes.
    return session_pb2.LogEvent(seq=seq, turn_id=turn_id, payload=b"\x00\xff" + str(seq).encode(), terminal=terminal)


async def open_session(stub, user_id: str = OWNER, **fields) -> session_pb2.Session:
    reply = await stub.OpenSession(session_pb2.OpenSessionRequest(user_id=user_id, **fields), timeout=CALL_TIMEOUT)
    return reply.session


async def append(stub, session_id: str, seqs, turn_id: str = "t1") -> int:
    request = session_pb2.AppendEventsRequest(session_id=session_id, events=[log_event(s, turn_id) for s in seqs])
    return (await stub.AppendEvents(request, timeout=CALL_TIMEOUT)).last_seq


def batch(session_id: str, seqs, turn_id: str = "t1") -> session_pb2.AppendEventsRequest:
    return session_pb2.AppendEventsRequest(session_id=session_id, events=[log_event(s, turn_id) for s in seqs])


async def append_batches(stub, *batches: session_pb2.AppendEventsRequest) -> list[session_pb2.AppendEventsResult]:
    request = session_pb2.AppendEventBatchesRequest(batches=batches)
    return list((await stub.AppendEventBatches(request, timeout=CALL_TIMEOUT)).results)


async def begin_turn(stub, session_id: str, turn_id: str = "t1", user_id: str = OWNER) -> int:
    request = session_pb2.BeginTurnRequest(user_id=user_id, session_id=session_id, turn_id=turn_id)
    return (await stub.BeginTurn(request, timeout=CALL_TIMEOUT)).last_seq


async def end_turn(stub, session_id: str, turn_id: str = "t1", tokens: int = 0, audio_ms: int = 0) -> None:
    request = session_pb2.EndTurnRequest(session_id=session_id, turn_id=turn_id, tokens=tokens, audio_ms=audio_ms)
    await stub.EndTurn(request, timeout=CALL_TIMEOUT)


async def get_session(stub, session_id: str, user_id: str = OWNER) -> session_pb2.Session:
    request = session_pb2.GetSessionRequest(user_id=user_id, session_id=session_id)
    return (await stub.GetSession(request, timeout=CALL_TIMEOUT)).session


async def update_session(stub, session_id: str, voice_options: bytes, user_id: str = OWNER) -> session_pb2.Session:
    request = session_pb2.UpdateSessionRequest(user_id=user_id, session_id=session_id, voice_options=voice_options)
    return (await stub.UpdateSession(request, timeout=CALL_TIMEOUT)).session


def read_request(session_id: str, after_seq: int = 0, *, follow: bool = False, user_id: str = OWNER):
    return session_pb2.ReadEventsRequest(user_id=user_id, session_id=session_id, after_seq=after_seq, follow=follow)


async def read_batches(stub, request, timeout: float = STREAM_TIMEOUT) -> list[list[session_pb2.LogEvent]]:
    """The whole stream as batches; fails (rather than hangs) if the stream does not end in time."""

    async def collect():
        return [list(reply.events) async for reply in stub.ReadEvents(request)]

    return await asyncio.wait_for(collect(), timeout)


async def read_seqs(stub, request, timeout: float = STREAM_TIMEOUT) -> list[int]:
    return [event.seq for batch in await read_batches(stub, request, timeout) for event in batch]


async def expect_status(code: grpc.StatusCode, call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


class Follower:
    """A ReadEvents(follow=True) stream consumed in the background, seqs published as they arrive."""

    def __init__(self, stub, request):
        self.seqs: list[int] = []
        self._arrived = asyncio.Condition()
        self.task = asyncio.create_task(self._run(stub, request))

    async def _run(self, stub, request) -> None:
        async for reply in stub.ReadEvents(request):
            async with self._arrived:
                self.seqs.extend(event.seq for event in reply.events)
                self._arrived.notify_all()

    async def wait_for_seq(self, seq: int, timeout: float = STREAM_TIMEOUT) -> None:
        async def arrived():
            async with self._arrived:
                await self._arrived.wait_for(lambda: seq in self.seqs or self.task.done())

        await asyncio.wait_for(arrived(), timeout)
        assert seq in self.seqs, f"stream ended before seq {seq}: got {self.seqs}"

    async def wait_until_ended(self, timeout: float = STREAM_TIMEOUT) -> list[int]:
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return self.seqs

    async def assert_still_open(self) -> None:
        await asyncio.sleep(0.05)
        assert not self.task.done(), f"follower ended early with {self.seqs}"

    def cancel(self) -> None:
        self.task.cancel()
