"""Fixtures that start the real history_service on port 0 over a SQLite file in tmp_path."""

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from duplex.common.server import GrpcServer
from duplex.history.v1 import history_pb2, history_pb2_grpc
from history_service.database import create_database_engine
from history_service.server import create_server
from history_service.settings import HistorySettings

ALICE = "alice"
BOB = "bob"

StatusOf = Callable[[Awaitable[object]], Awaitable[grpc.StatusCode]]


@pytest.fixture
def history_settings(tmp_path: Path) -> HistorySettings:
    # Explicit values, so DUPLEX_* variables in the environment cannot change what a test exercises.
    return HistorySettings(
        history_listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        database_url=None,
        shutdown_grace_seconds=0.5,
    )


@pytest.fixture
async def history_server(history_settings: HistorySettings) -> AsyncIterator[GrpcServer]:
    server = await create_server(history_settings)
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def channel(history_server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{history_server.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> history_pb2_grpc.HistoryServiceStub:
    return history_pb2_grpc.HistoryServiceStub(channel)


@pytest.fixture
async def database(history_server: GrpcServer, history_settings: HistorySettings) -> AsyncIterator[AsyncEngine]:
    """A second engine on the server's database file, to look at (or arrange) rows behind the API."""
    engine = create_database_engine(history_settings.effective_database_url())
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def status_of() -> StatusOf:
    """Await a call and return its status code (OK when it succeeded)."""

    async def status(call: Awaitable[object]) -> grpc.StatusCode:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    return status


@pytest.fixture
def create_conversation(
    stub: history_pb2_grpc.HistoryServiceStub,
) -> Callable[..., Awaitable[history_pb2.Conversation]]:
    async def create(user_id: str = ALICE, title: str = "") -> history_pb2.Conversation:
        request = history_pb2.CreateConversationRequest(user_id=user_id, title=title)
        return (await stub.CreateConversation(request)).conversation

    return create


@pytest.fixture
def append_message(
    stub: history_pb2_grpc.HistoryServiceStub,
) -> Callable[..., Awaitable[history_pb2.AppendMessageResponse]]:
    async def append(
        conversation_id: str, content: str = "hello", user_id: str = ALICE, **fields: object
    ) -> history_pb2.AppendMessageResponse:
        fields.setdefault("role", history_pb2.ROLE_USER)
        request = history_pb2.AppendMessageRequest(
            user_id=user_id, conversation_id=conversation_id, content=content, **fields
        )
        return await stub.AppendMessage(request)

    return append
