"""Fixtures that start the real history_service on port 0, once per backend: SQLite and PostgreSQL.

Every test that uses `history_server` (or `database_url`) runs twice. SQLite gets a copy of a database file
migrated once per session, in tmp_path, reached through the embedded default (no database_url). PostgreSQL
gets a database migrated once per session, with every table emptied before each test. Tests about
migrations make their own empty databases with `postgres_databases`.
"""

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from duplex.common.server import GrpcServer
from duplex.history.v1 import history_pb2, history_pb2_grpc
from history_service.database import create_database_engine
from history_service.migrate import migrate
from history_service.models import Base
from history_service.server import create_server
from history_service.settings import DATABASE_FILE_NAME, HistorySettings
from tests import postgres_fixtures
from tests.postgres_fixtures import PostgresDatabases, empty_tables, run_async

ALICE = "alice"
BOB = "bob"
BACKENDS = ("sqlite", "postgres")

StatusOf = Callable[[Awaitable[object]], Awaitable[grpc.StatusCode]]

postgres_url = postgres_fixtures.postgres_url
postgres_databases = postgres_fixtures.postgres_databases


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file to copy."""
    data_dir = tmp_path_factory.mktemp("sqlite-template")
    run_async(migrate(HistorySettings(data_dir=data_dir, database_url=None)))
    return data_dir / DATABASE_FILE_NAME


@pytest.fixture(scope="session")
def postgres_history_url(postgres_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database for the whole session; `database_url` empties it before each test."""
    databases = PostgresDatabases(postgres_url)
    url = databases.create(prefix="duplex_history")
    run_async(migrate(HistorySettings(database_url=url)))
    try:
        yield url
    finally:
        databases.drop_all()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None for SQLite (the embedded default in tmp_path/data), an emptied database's URL for PostgreSQL."""
    if backend == "sqlite":
        (tmp_path / "data").mkdir()
        shutil.copyfile(request.getfixturevalue("sqlite_template"), tmp_path / "data" / DATABASE_FILE_NAME)
        return None
    url = request.getfixturevalue("postgres_history_url")
    empty_tables(url, [table.name for table in Base.metadata.sorted_tables])
    return url


@pytest.fixture
def history_settings(tmp_path: Path, database_url: str | None) -> HistorySettings:
    # Explicit values, so DUPLEX_* variables in the environment cannot change what a test exercises.
    return HistorySettings(
        history_listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        database_url=database_url,
        shutdown_grace_seconds=0.5,
        # Nothing answers here: tests that need llm_service start a fake one.
        llm_target="127.0.0.1:1",
        worker_id="test-worker",
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
async def database(history_settings: HistorySettings) -> AsyncIterator[AsyncEngine]:
    """A second engine on the test's database, to look at (or arrange) rows behind the API."""
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
