"""Schema migrations: the API behind `duplex migrate`, and the check the service makes before it serves.

    await migrate(settings)          # upgrade to the newest revision (creates the SQLite file if needed)
    await current_revision(settings) # the database's revision, None when it was never migrated
    await is_up_to_date(settings)    # True when the database is at this code's newest revision
    head_revision()                  # this code's newest revision

A database must be migrated before history_service serves it, except the embedded SQLite default, which
migrates itself at start so a fresh checkout runs with zero setup. Processes may migrate one database at
the same time (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE); two migrations inside ONE process
may not run concurrently, because alembic keeps its context in module globals.
"""

import functools
import logging
from enum import StrEnum

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from sqlalchemy import Connection, NullPool, event, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from history_service.database import create_database_engine
from history_service.settings import HistorySettings

log = logging.getLogger(__name__)

# The revision that matches the tables history_service created before it had migrations.
INITIAL_REVISION = "0001"
LEGACY_TABLES = frozenset({"conversations", "messages"})
NOT_MIGRATED = "database is not migrated"
RUN_MIGRATE = "run `duplex migrate`"


class SchemaState(StrEnum):
    EMPTY = "empty"  # never migrated, no tables
    LEGACY = "legacy"  # tables from before migrations existed, no revision
    OUTDATED = "outdated"  # an older revision of this code
    CURRENT = "current"  # this code's newest revision
    AHEAD = "ahead"  # a revision this code does not know: newer code migrated it


class DatabaseNotMigrated(RuntimeError):
    """The database needs `duplex migrate` before this version of history_service can serve it."""


def alembic_config(settings: HistorySettings | None = None) -> Config:
    """Alembic's configuration without an ini file; env.py reads the URL from `settings` (or the environment)."""
    config = Config()
    config.set_main_option("script_location", "history_service:migrations")
    config.set_main_option("path_separator", "os")
    config.attributes["settings"] = settings
    return config


@functools.cache
def _script_directory() -> ScriptDirectory:
    # The revision files ship with the code and never change while it runs.
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    return _script_directory().get_current_head()


async def migrate(settings: HistorySettings, revision: str = "head") -> str | None:
    """Upgrade the database to `revision` and return the revision it is at afterwards."""
    engine = create_migration_engine(settings.effective_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_upgrade, alembic_config(settings), revision)
            await connection.commit()
        return await revision_of(engine)
    finally:
        await engine.dispose()


async def current_revision(settings: HistorySettings) -> str | None:
    engine = create_database_engine(settings.effective_database_url(), poolclass=NullPool)
    try:
        return await revision_of(engine)
    finally:
        await engine.dispose()


async def is_up_to_date(settings: HistorySettings) -> bool:
    engine = create_database_engine(settings.effective_database_url(), poolclass=NullPool)
    try:
        return await schema_state(engine) is SchemaState.CURRENT
    finally:
        await engine.dispose()


async def revision_of(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_revision)


async def schema_state(engine: AsyncEngine) -> SchemaState:
    async with engine.connect() as connection:
        return await connection.run_sync(_state)


async def ensure_migrated(settings: HistorySettings, engine: AsyncEngine) -> None:
    """Make sure `engine`'s database has this code's schema, or raise DatabaseNotMigrated.

    Only the embedded SQLite default is migrated here; any configured database is migrated on purpose,
    by `duplex migrate`, typically once per deploy rather than by every replica at once.
    """
    state = await schema_state(engine)
    if settings.uses_embedded_database and state in (SchemaState.EMPTY, SchemaState.LEGACY, SchemaState.OUTDATED):
        log.info("migrating the embedded database (%s)", state)
        await migrate(settings)
        state = await schema_state(engine)
    if state is SchemaState.AHEAD:
        # Old code on a newer schema: migrations are written to keep the previous release working.
        log.warning("database revision %s is newer than this code's %s", await revision_of(engine), head_revision())
        return
    if state is not SchemaState.CURRENT:
        raise DatabaseNotMigrated(await _not_migrated_message(engine, state))


async def _not_migrated_message(engine: AsyncEngine, state: SchemaState) -> str:
    where = engine.url.render_as_string(hide_password=True)
    if state is SchemaState.OUTDATED:
        detail = f"{where} is at revision {await revision_of(engine)}, this version needs {head_revision()}"
    elif state is SchemaState.LEGACY:
        detail = f"{where} was created before migrations existed"
    else:
        detail = f"{where} has no schema"
    return f"{NOT_MIGRATED}: {RUN_MIGRATE} ({detail})"


def create_migration_engine(url: str) -> AsyncEngine:
    """An engine for migrating: one throwaway connection, and on SQLite real transactional DDL."""
    engine = create_database_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _prepare_sqlite_for_migrations)
        event.listen(engine.sync_engine, "begin", _begin_sqlite_immediately)
    return engine


def _prepare_sqlite_for_migrations(dbapi_connection, _connection_record) -> None:
    # Batch migrations rebuild a table by copy-and-drop; with foreign keys on, dropping a parent would
    # cascade-delete its children. The pragma only works outside a transaction, hence at connect.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=OFF")
    finally:
        cursor.close()
    # Stop the driver from committing around DDL on its own, so a failed migration rolls back whole.
    dbapi_connection.isolation_level = None


def _begin_sqlite_immediately(connection: Connection) -> None:
    # IMMEDIATE takes the write lock up front: a second process migrating the same file waits for the
    # first (busy_timeout) and then finds the work done, instead of failing to upgrade a read lock.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    if _state(connection) is SchemaState.LEGACY:
        log.info("adopting tables created before migrations existed as revision %s", INITIAL_REVISION)
        command.stamp(config, INITIAL_REVISION)
    command.upgrade(config, revision)


def _revision(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    return ",".join(heads) if heads else None


def _state(connection: Connection) -> SchemaState:
    current = set(MigrationContext.configure(connection).get_current_heads())
    if not current:
        tables = set(inspect(connection).get_table_names())
        return SchemaState.LEGACY if LEGACY_TABLES <= tables else SchemaState.EMPTY
    script = _script_directory()
    if current == set(script.get_heads()):
        return SchemaState.CURRENT
    if all(_is_known(script, revision) for revision in current):
        return SchemaState.OUTDATED
    return SchemaState.AHEAD


def _is_known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except RevisionError:
        return False
