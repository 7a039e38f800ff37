"""The settings every service shares; each service subclasses ServiceSettings with its own fields."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Read once from DUPLEX_* environment variables in a service's main and passed in."""

    model_config = SettingsConfigDict(env_prefix="DUPLEX_", extra="ignore")

    log_level: str = "INFO"
    # How long a stopping server lets running calls finish before cancelling them.
    shutdown_grace_seconds: float = 5.0
