"""Engine and session factory. The only place that knows which database backend is in use."""

import logging

from sqlalchemy import Pool, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)

# Writers wait this long for SQLite's single write lock instead of failing at once.
SQLITE_BUSY_TIMEOUT_MS = 5_000


def create_database_engine(url: str, *, poolclass: type[Pool] | None = None) -> AsyncEngine:
    """An engine for the URL; NullPool (one connection per use) suits short jobs such as migrations."""
    options = {"poolclass": poolclass} if poolclass is not None else {"pool_pre_ping": True}
    if poolclass is None and make_url(url).get_backend_name() == "sqlite":
        # SQLite has one writer: with several pooled connections, concurrent transactions fail with
        # "database is locked" under load. One connection queues them in-process instead. It is a file,
        # not a server, so it never goes stale: no ping on checkout (four thread hops per transaction).
        options.update(pool_size=1, max_overflow=0, pool_timeout=60, pool_pre_ping=False)
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
    log.info("database %s", describe_url(url))
    return engine


def describe_url(url: str) -> str:
    """The URL for logs and messages: the password is masked."""
    return make_url(url).render_as_string(hide_password=True)


def _configure_sqlite_connection(dbapi_connection, _connection_record) -> None:
    # Per-connection settings: WAL lets readers run alongside the writer, and SQLite ignores
    # foreign keys (so ON DELETE CASCADE) unless asked on every connection.
    # synchronous stays FULL (the default): every commit is fsynced, so an acknowledged message also
    # survives a power loss. NORMAL would survive only a process crash, for ~80 us of CPU per commit here,
    # a few per cent of an append.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: rows stay readable after commit without another (async-unsafe) lazy load.
    return async_sessionmaker(engine, expire_on_commit=False)


async def check_connection(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
