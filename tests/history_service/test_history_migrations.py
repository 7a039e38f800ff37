"""Migrations on both backends, and the service's refusal to serve a database that lacks them."""

import asyncio
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, make_url, text

from history_service.database import create_database_engine, create_sessionmaker
from history_service.migrate import (
    DatabaseNotMigrated,
    alembic_config,
    current_revision,
    head_revision,
    is_up_to_date,
    migrate,
)
from history_service.models import Base
from history_service.search import MessageSearch, parse_search_query
from history_service.server import EXIT_DATABASE_NOT_MIGRATED, create_server
from history_service.settings import HistorySettings

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
NOT_MIGRATED = "database is not migrated: run `duplex migrate`"
CONVERSATION_ID = "9d5e1a3c-4d5b-4c1e-9a0c-1f2e3d4c5b6a"
# Per-dialect search machinery lives only in the migrations, by design.
SEARCH_OBJECTS = {"search_vector", "ix_messages_search_vector"}


@pytest.fixture
def empty_database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{(tmp_path / 'explicit.db').as_posix()}"
    return request.getfixturevalue("postgres_databases").create()


def settings_for(url: str | None, tmp_path: Path) -> HistorySettings:
    return HistorySettings(
        history_listen="127.0.0.1:0", data_dir=tmp_path / "data", database_url=url, llm_target="127.0.0.1:1"
    )


async def run_sync(url: str, function):
    engine = create_database_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.run_sync(function)
            await connection.commit()
            return result
    finally:
        await engine.dispose()


async def test_upgrade_on_an_empty_database_reaches_head_once(empty_database_url, tmp_path):
    settings = settings_for(empty_database_url, tmp_path)
    assert await current_revision(settings) is None
    assert not await is_up_to_date(settings)

    assert await migrate(settings) == head_revision()
    assert await migrate(settings) == head_revision()  # nothing left to do

    assert await is_up_to_date(settings)


MIGRATE_IN_A_PROCESS = (
    "import asyncio; from history_service.migrate import migrate; from history_service.settings import "
    "HistorySettings; print(asyncio.run(migrate(HistorySettings())))"
)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_two_processes_migrating_at_once_both_succeed(empty_database_url):
    # Processes, as two replicas or two `duplex migrate` runs would be: alembic keeps per-process global
    # state, so concurrent migrations inside one process are not supported. PostgreSQL only: the advisory
    # lock is what is at stake; on SQLite, BEGIN IMMEDIATE makes the second wait for the first.
    environment = {**os.environ, "DUPLEX_DATABASE_URL": empty_database_url}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MIGRATE_IN_A_PROCESS,
            cwd=REPOSITORY_ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.gather(*(process.communicate() for process in processes))

    assert [process.returncode for process in processes] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    assert [out.decode().strip() for out, _ in outputs] == [head_revision()] * 2


def schema_differences(connection: Connection) -> list:
    def compared(obj, name, type_, reflected, compare_to) -> bool:
        return not (name in SEARCH_OBJECTS or (type_ == "table" and name.startswith(("messages_fts", "sqlite_"))))

    context = MigrationContext.configure(connection, opts={"include_object": compared, "compare_type": True})
    return compare_metadata(context, Base.metadata)


async def test_the_migrated_schema_is_what_the_models_describe(empty_database_url, tmp_path):
    await migrate(settings_for(empty_database_url, tmp_path))
    assert await run_sync(empty_database_url, schema_differences) == []


async def test_downgrade_to_base_and_upgrade_again(empty_database_url, tmp_path):
    settings = settings_for(empty_database_url, tmp_path)
    await migrate(settings)
    # alembic's own command, through env.py's path that reads the URL from the settings.
    await asyncio.to_thread(command.downgrade, alembic_config(settings), "base")

    assert await run_sync(empty_database_url, lambda c: set(inspect(c).get_table_names())) <= {"alembic_version"}
    assert await migrate(settings) == head_revision()


async def test_tables_from_before_migrations_are_adopted_and_indexed(empty_database_url, tmp_path):
    settings = settings_for(empty_database_url, tmp_path)
    await migrate(settings, "0001")
    await run_sync(empty_database_url, make_legacy_database)

    assert await migrate(settings) == head_revision()

    engine = create_database_engine(empty_database_url)
    try:
        page = await MessageSearch(create_sessionmaker(engine)).search("alice", parse_search_query("kept"), 10)
    finally:
        await engine.dispose()
    assert [hit.message.content for hit in page.hits] == ["a message kept from before"]


def make_legacy_database(connection: Connection) -> None:
    """What create_all left behind: revision 0001's tables with rows, and no alembic_version."""
    connection.execute(text("DROP TABLE alembic_version"))
    connection.execute(
        text(
            "INSERT INTO conversations (id, user_id, title, created_at, updated_at, message_count) "
            "VALUES (:id, 'alice', 'old', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
        ),
        {"id": CONVERSATION_ID},
    )
    connection.execute(
        text(
            "INSERT INTO messages (id, conversation_id, role, content, status, model, prompt_tokens, "
            "completion_tokens, created_at) VALUES (:id, :conversation, 'user', 'a message kept from before', "
            "'complete', '', 0, 0, CURRENT_TIMESTAMP)"
        ),
        {"id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "conversation": CONVERSATION_ID},
    )


@pytest.mark.parametrize("backend", ["postgres"])
async def test_the_service_refuses_an_unmigrated_postgres_database(empty_database_url, tmp_path):
    with pytest.raises(DatabaseNotMigrated, match=re.escape(NOT_MIGRATED)):
        await create_server(settings_for(empty_database_url, tmp_path))


async def test_the_service_refuses_an_outdated_database(empty_database_url, tmp_path):
    settings = settings_for(empty_database_url, tmp_path)
    await migrate(settings, "0001")

    with pytest.raises(DatabaseNotMigrated, match=f"at revision 0001, this version needs {head_revision()}"):
        await create_server(settings)


@pytest.mark.parametrize("backend", ["postgres"])
def test_python_m_history_service_exits_non_zero_on_an_unmigrated_database(empty_database_url):
    environment = {
        **os.environ,
        "DUPLEX_DATABASE_URL": empty_database_url,
        "DUPLEX_HISTORY_LISTEN": "127.0.0.1:0",
        "DUPLEX_LLM_TARGET": "127.0.0.1:1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "history_service"],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == EXIT_DATABASE_NOT_MIGRATED
    assert NOT_MIGRATED in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["postgres"])
async def test_the_database_password_is_never_logged(empty_database_url, tmp_path, caplog):
    password = "s3cret-Pa55word"
    # The throwaway server trusts local connections, so the password is carried but never checked.
    url = make_url(empty_database_url).set(password=password).render_as_string(hide_password=False)
    settings = settings_for(url, tmp_path)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(DatabaseNotMigrated) as refused:
        await create_server(settings)

    assert password not in caplog.text
    assert password not in str(refused.value)
    assert password not in repr(settings)
    assert "***" in caplog.text


async def test_the_embedded_sqlite_default_migrates_itself(tmp_path):
    settings = settings_for(None, tmp_path)

    server = await create_server(settings)
    await server.stop(0)

    assert await is_up_to_date(settings)


async def test_an_explicit_sqlite_url_is_not_migrated_automatically(tmp_path):
    url = f"sqlite+aiosqlite:///{(tmp_path / 'explicit.db').as_posix()}"
    with pytest.raises(DatabaseNotMigrated, match=re.escape(NOT_MIGRATED)):
        await create_server(settings_for(url, tmp_path))
