from pathlib import Path

from duplex.common.settings import ServiceSettings

DATABASE_FILE_NAME = "history.db"


class HistorySettings(ServiceSettings):
    history_listen: str = "127.0.0.1:50054"
    # Where the embedded SQLite file lives when no database_url is given.
    data_dir: Path = Path("data")
    # Any SQLAlchemy async URL, e.g. postgresql+asyncpg://user:pass@host/duplex; None means SQLite in data_dir.
    database_url: str | None = None

    def effective_database_url(self) -> str:
        """The URL to connect to; for the embedded default it creates data_dir so a fresh checkout just runs."""
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(self.data_dir / DATABASE_FILE_NAME).as_posix()}"
