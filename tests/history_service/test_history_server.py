"""The process around the servicer: health, reflection, persistence, settings, startup failures."""

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from duplex.history.v1 import history_pb2, history_pb2_grpc
from history_service.server import create_server
from history_service.settings import HistorySettings

ALICE = "alice"
SERVICE = "duplex.history.v1.HistoryService"


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_is_serving(channel, service):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = [
        response
        async for response in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {service.name for service in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_data_survives_a_restart_on_the_same_file(history_settings):
    first = await create_server(history_settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            created = await stub.CreateConversation(history_pb2.CreateConversationRequest(user_id=ALICE, title="kept"))
            conversation_id = created.conversation.conversation_id
            await stub.AppendMessage(
                history_pb2.AppendMessageRequest(
                    user_id=ALICE,
                    conversation_id=conversation_id,
                    role=history_pb2.ROLE_USER,
                    content="remember me",
                    client_message_id="c1",
                )
            )
    finally:
        await first.stop(0)

    second = await create_server(history_settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            listed = await stub.ListMessages(
                history_pb2.ListMessagesRequest(user_id=ALICE, conversation_id=conversation_id)
            )
            retry = await stub.AppendMessage(
                history_pb2.AppendMessageRequest(
                    user_id=ALICE, conversation_id=conversation_id, role=history_pb2.ROLE_USER, client_message_id="c1"
                )
            )
    finally:
        await second.stop(0)

    assert [message.content for message in listed.messages] == ["remember me"]
    assert retry.duplicate
    assert retry.message.content == "remember me"


async def test_an_unreachable_database_fails_startup(tmp_path: Path):
    missing_directory = tmp_path / "missing" / "history.db"
    settings = HistorySettings(
        history_listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{missing_directory.as_posix()}"
    )
    with pytest.raises(Exception, match="unable to open database file"):
        await create_server(settings)
    await until_sqlite_worker_threads_finish()


async def until_sqlite_worker_threads_finish(timeout: float = 5.0) -> None:
    """aiosqlite stops the worker thread of a failed connect without awaiting it; the thread then reports
    back to the event loop, which must still be open (or pytest flags an unhandled thread exception)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while any("_connection_worker_thread" in thread.name for thread in threading.enumerate()):
        assert asyncio.get_running_loop().time() < deadline, "aiosqlite worker thread did not stop"
        await asyncio.sleep(0.01)


def test_default_database_is_a_sqlite_file_in_data_dir(tmp_path: Path):
    data_dir = tmp_path / "nested" / "data"
    settings = HistorySettings(data_dir=data_dir, database_url=None)

    assert settings.effective_database_url() == f"sqlite+aiosqlite:///{data_dir.as_posix()}/history.db"
    assert data_dir.is_dir()


def test_an_explicit_database_url_wins(tmp_path: Path):
    url = "postgresql+asyncpg://duplex:secret@127.0.0.1/duplex"
    settings = HistorySettings(data_dir=tmp_path / "unused", database_url=url)

    assert settings.effective_database_url() == url
    assert not (tmp_path / "unused").exists()


def test_settings_come_from_duplex_environment_variables(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DUPLEX_HISTORY_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("DUPLEX_DATA_DIR", str(tmp_path))

    settings = HistorySettings()

    assert settings.history_listen == "0.0.0.0:6000"
    assert settings.data_dir == tmp_path
    assert settings.database_url is None
