"""The settings every service shares; each service subclasses ServiceSettings with its own fields."""

import sys
from typing import Literal, NoReturn, TypeVar

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Read once from DUPLEX_* environment variables in a service's main and passed in."""

    model_config = SettingsConfigDict(env_prefix="DUPLEX_", extra="ignore")

    log_level: str = "INFO"
    # How long a stopping server lets running calls finish before cancelling them.
    shutdown_grace_seconds: float = 5.0
    # The event loop the service runs on: uvloop (libuv) or the standard library's.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


S = TypeVar("S", bound=ServiceSettings)


class ConfigurationError(ValueError):
    """A setting that cannot work, found after the settings loaded (a key file that holds no key, say)."""


def load_settings(settings_class: type[S], service: str) -> S:
    """The service's settings; bad ones print one line naming each variable and exit 2 (no traceback)."""
    try:
        return settings_class()
    except pydantic.ValidationError as error:
        exit_bad_configuration(service, describe_errors(error))


def describe_errors(error: pydantic.ValidationError) -> str:
    """One line naming each bad variable (never its value: it may be a secret)."""
    problems = []
    for problem in error.errors(include_input=False, include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        where = "_".join(str(part) for part in problem["loc"]).upper()
        problems.append(f"DUPLEX_{where}: {message}" if where else message)
    return "; ".join(problems)


def exit_bad_configuration(service: str, message: str) -> NoReturn:
    print(f"{service}: bad configuration: {message}", file=sys.stderr)
    raise SystemExit(2)
