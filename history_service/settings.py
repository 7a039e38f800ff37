import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr

from duplex.common.settings import ServiceSettings

DATABASE_FILE_NAME = "history.db"


def default_worker_id() -> str:
    # Unique per process, and readable in jobs.locked_by when a lease needs explaining.
    return f"{socket.gethostname()}-{os.getpid()}"


class HistorySettings(ServiceSettings):
    history_listen: str = "127.0.0.1:50054"
    # Where the embedded SQLite file lives when no database_url is given.
    data_dir: Path = Path("data")
    # Any SQLAlchemy async URL, e.g. postgresql+asyncpg://user:pass@host/duplex; None means SQLite in data_dir.
    # A secret because it usually carries the password.
    database_url: SecretStr | None = None

    # The job worker that writes session summaries (and any later background work).
    job_poll_interval_seconds: float = 5.0
    # How long a claimed job is reserved for its worker; a crashed worker's jobs are claimed again after it.
    job_lease_seconds: float = 120.0
    job_max_attempts: int = 5
    # The first retry waits this long, each further retry twice as long (capped at an hour).
    job_retry_backoff_seconds: float = 10.0
    worker_id: str = Field(default_factory=default_worker_id)

    # llm_service, which writes the summaries.
    llm_target: str = "127.0.0.1:50052"
    # The model for summaries; empty means llm_service's default.
    summary_model: str = ""

    @property
    def uses_embedded_database(self) -> bool:
        """True for the zero-setup SQLite default, which migrates itself at start."""
        return self.database_url is None or not self.database_url.get_secret_value()

    def effective_database_url(self) -> str:
        """The URL to connect to; for the embedded default it creates data_dir so a fresh checkout just runs."""
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(self.data_dir / DATABASE_FILE_NAME).as_posix()}"
