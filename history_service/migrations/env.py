"""Alembic environment for the history database.

history_service.migrate hands over an open connection in config.attributes["connection"]; without one
(alembic's own commands, e.g. autogenerating a revision) the URL comes from HistorySettings, i.e. from
DUPLEX_DATABASE_URL or the embedded SQLite default, never from an ini file.
"""

import asyncio

from alembic import context
from sqlalchemy import Connection, text

from history_service.migrate import create_migration_engine
from history_service.models import Base
from history_service.settings import HistorySettings

# Any constant both migrating processes agree on: pg_advisory_xact_lock's key ("dplx" in ASCII).
MIGRATION_LOCK_KEY = 0x64706C78


def run_migrations(connection: Connection) -> None:
    """Run on a connection from history_service.migrate.create_migration_engine."""
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two `duplex migrate` runs at once: the second waits, then finds nothing left to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def run_migrations_from_settings() -> None:
    settings = context.config.attributes.get("settings") or HistorySettings()
    engine = create_migration_engine(settings.effective_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: the migrations branch on the live dialect")
if (handed_over := context.config.attributes.get("connection")) is not None:
    run_migrations(handed_over)
else:
    asyncio.run(run_migrations_from_settings())
