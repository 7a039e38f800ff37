"""session_service's settings, read from DUPLEX_* environment variables."""

from duplex.common.settings import ServiceSettings


class SessionSettings(ServiceSettings):
    session_listen: str = "127.0.0.1:50053"
    # Sliding TTL: a session nobody uses for this long disappears with its event log.
    session_ttl_seconds: float = 3600
    # Per-session log bound so one long session cannot eat the process; the oldest events are dropped.
    session_log_max_events: int = 10000
    # A running turn whose owner stops appending for this long is considered dead: a new BeginTurn may
    # take it over, and followers stop waiting for it.
    turn_lease_seconds: float = 60
