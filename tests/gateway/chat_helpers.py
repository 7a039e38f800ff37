"""A small test client for the bidi Chat stream."""

import asyncio
import time
import uuid

import grpc

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc

TERMINAL = ("turn_completed", "turn_cancelled", "error")


class ChatStream:
    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, metadata=None):
        self._requests: asyncio.Queue[chat_pb2.ChatRequest | None] = asyncio.Queue()
        self.call = stub.Chat(self._request_iterator(), metadata=metadata)
        self.received_at: list[float] = []

    async def _request_iterator(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def send(self, **kind) -> None:
        await self._requests.put(chat_pb2.ChatRequest(**kind))

    async def half_close(self) -> None:
        await self._requests.put(None)

    async def next_event(self, timeout: float = 10.0) -> chat_pb2.ChatEvent:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF, "the stream ended"
        self.received_at.append(time.monotonic())
        return response.event

    async def open(self, **fields) -> chat_pb2.ChatEvent:
        await self.send(open=chat_pb2.OpenSession(**fields))
        event = await self.next_event()
        assert event.WhichOneof("kind") == "session_opened", event
        return event

    async def say(self, text: str, client_message_id: str | None = None) -> str:
        message_id = client_message_id or uuid.uuid4().hex
        await self.send(message=chat_pb2.UserMessage(client_message_id=message_id, text=text))
        return message_id

    async def until(self, *kinds: str, timeout: float = 15.0) -> list[chat_pb2.ChatEvent]:
        """Events up to and including the first whose kind is in `kinds`."""
        events = []
        while True:
            event = await self.next_event(timeout)
            events.append(event)
            if event.WhichOneof("kind") in kinds:
                return events

    async def until_turn_ends(self, timeout: float = 15.0) -> list[chat_pb2.ChatEvent]:
        """Events up to the turn's terminal event (errors about one request have no turn id)."""
        events = []
        while not events or not is_turn_end(events[-1]):
            events.append(await self.next_event(timeout))
        return events

    def cancel(self) -> None:
        self.call.cancel()


def is_turn_end(event: chat_pb2.ChatEvent) -> bool:
    return event.WhichOneof("kind") in TERMINAL and bool(event.turn_id)


def kinds(events) -> list[str]:
    return [event.WhichOneof("kind") for event in events]


def text_of(events) -> str:
    return "".join(event.delta.text for event in events if event.WhichOneof("kind") == "delta")


async def collect(call, timeout: float = 15.0) -> list[chat_pb2.ChatEvent]:
    """Every event of a server-streaming call, to its end."""

    async def read_all():
        events = []
        while (response := await call.read()) is not grpc.aio.EOF:
            events.append(response.event)
        return events

    return await asyncio.wait_for(read_all(), timeout)
