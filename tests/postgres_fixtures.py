"""A PostgreSQL server for tests, and fresh databases on it.

`postgres_url` (session scope) is DUPLEX_TEST_DATABASE_URL when set (a postgresql+asyncpg:// URL whose user
may CREATE DATABASE), otherwise a throwaway server started from the installed PostgreSQL binaries, listening
on 127.0.0.1 only, without durability (fsync off) because it is deleted at the end of the session.
`postgres_databases` creates databases on it (optionally cloned from a template) and drops them after the
test; `empty_tables` resets a database between tests far faster than creating one (CREATE DATABASE
checkpoints, ~0.1-0.4 s; TRUNCATE takes ~10 ms). When PostgreSQL cannot be started or reached, tests
FAIL: a skipped backend would look like a pass.

Both are plain (sync) fixtures: their bit of async work runs on a private event loop in a helper thread,
so they can be used from sync and async tests alike without touching the test's event loop.

Use from a conftest.py:  postgres_url = postgres_fixtures.postgres_url
"""

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import URL, make_url

TEST_DATABASE_URL_ENV = "DUPLEX_TEST_DATABASE_URL"
POSTGRES_BINARIES = "/usr/lib/postgresql/*/bin"
# initdb refuses to run as root; as root, the server runs as this user.
POSTGRES_OS_USER = "postgres"
START_TIMEOUT_SECONDS = 30
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
# Durability is pointless for a server deleted after the run, and costs most of its time.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}


T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop in a helper thread, whatever loop this thread has."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


def asyncpg_dsn(url: str | URL) -> str:
    """The libpq-style DSN asyncpg takes for a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str | URL, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary directory, deleted when it stops."""

    bin_dir: Path
    root: Path
    port: int = 0
    run_as: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> "ThrowawayPostgres":
        run_as, owner = _os_user()
        root = Path(tempfile.mkdtemp(prefix="duplex-postgres-"))
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        server = cls(_newest_bin_dir(), root, run_as=run_as)
        server._run(
            "initdb",
            "-D",
            str(server.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        return server

    def start(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            self._write_settings()
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(START_TIMEOUT_SECONDS),
                    "start",
                )
                return
            except RuntimeError:
                if attempt == START_ATTEMPTS:
                    raise

    def stop(self) -> None:
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _write_settings(self) -> None:
        # postgresql.auto.conf is read last, so later attempts' ports override earlier ones.
        lines = [f"{name} = {value}" for name, value in {**SERVER_SETTINGS, "port": str(self.port)}.items()]
        (self.data_dir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")

    def _run(self, program: str, *args: str) -> None:
        command = [*self.run_as, str(self.bin_dir / program), *args]
        # cwd: the postgres user may not be allowed into the directory pytest runs from.
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{log_tail}")


def _newest_bin_dir() -> Path:
    candidates = [Path(path) for path in glob.glob(POSTGRES_BINARIES) if (Path(path) / "initdb").exists()]
    if not candidates:
        raise RuntimeError(f"no PostgreSQL binaries in {POSTGRES_BINARIES} (apt-get install postgresql)")
    return max(candidates, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)


def _os_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs the server's programs, and the user who must own its files."""
    if os.geteuid() != 0:
        return [], None
    try:
        owner = pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        raise RuntimeError(f"running as root needs a {POSTGRES_OS_USER!r} OS user to run PostgreSQL") from None
    return ["runuser", "-u", POSTGRES_OS_USER, "--"], owner


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def empty_tables(url: str, tables: list[str]) -> None:
    """Delete every row of `tables` and restart their sequences."""
    run_async(_truncate(url, tables))


async def _truncate(url: str, tables: list[str]) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url), timeout=10)
    try:
        # A connection left behind by a broken test must make this fail, not hang.
        await connection.execute("SET lock_timeout = '5s'")
        await connection.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()


async def _check_reachable(url: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url), timeout=10)
    await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A postgresql+asyncpg URL of a server the tests may create databases on."""
    if configured := os.environ.get(TEST_DATABASE_URL_ENV):
        try:
            run_async(_check_reachable(configured))
        except Exception as error:
            pytest.fail(f"{TEST_DATABASE_URL_ENV} is set but PostgreSQL cannot be reached: {error!r}")
        yield configured
        return
    try:
        server = ThrowawayPostgres.create()
    except Exception as error:
        pytest.fail(f"cannot create a throwaway PostgreSQL: {error}")
    try:
        server.start()
        run_async(_check_reachable(server.url))
    except Exception as error:
        server.stop()
        pytest.fail(f"cannot start a throwaway PostgreSQL: {error}")
    try:
        yield server.url
    finally:
        server.stop()


class PostgresDatabases:
    """Creates databases on the test server and drops them again."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.created: list[str] = []

    def create(self, template: str | None = None, prefix: str = "duplex_test") -> str:
        """A new empty database, or a copy of `template`; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        run_async(self._create(name, template))
        self.created.append(name)
        return with_database(self.server_url, name)

    def drop(self, name: str) -> None:
        run_async(self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def drop_all(self) -> None:
        while self.created:
            self.drop(self.created.pop())

    async def _create(self, name: str, template: str | None) -> None:
        async with self._connection() as connection:
            await connection.execute(f'CREATE DATABASE "{name}" {self._source(connection, template)}')

    async def _execute(self, statement: str) -> None:
        async with self._connection() as connection:
            await connection.execute(statement)

    @staticmethod
    def _source(connection: asyncpg.Connection, template: str | None) -> str:
        if template is None:
            # C collation and ctype: strings sort by code point, as in Python and SQLite, whatever the
            # server's default locale.
            return "TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        # Copying the files of a small template is several times faster than the default WAL_LOG (PG 15+).
        strategy = " STRATEGY FILE_COPY" if connection.get_server_version().major >= 15 else ""
        return f'TEMPLATE "{template}"{strategy}'

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        connection = await asyncpg.connect(asyncpg_dsn(self.server_url), timeout=10)
        try:
            yield connection
        finally:
            await connection.close()


@pytest.fixture
def postgres_databases(postgres_url: str) -> Iterator[PostgresDatabases]:
    """Databases for one test, dropped after it."""
    databases = PostgresDatabases(postgres_url)
    try:
        yield databases
    finally:
        databases.drop_all()
