"""session_service's settings, read from DUPLEX_* environment variables."""

from pydantic import SecretStr

from duplex.common.settings import ServiceSettings


class SessionSettings(ServiceSettings):
    session_listen: str = "127.0.0.1:50053"
    # Sliding TTL: a session nobody uses for this long disappears with its event log.
    session_ttl_seconds: float = 3600
    # Per-session log bound so one long session cannot eat the process; the oldest events are dropped.
    # The log serves resumes, which need the events since a client's last seq: 1000 is ~40 answers of
    # ~25 events (~0.5 MB per session at most), and a client further behind reloads from history.
    # (Redis trims approximately: at least this many are kept.)
    session_log_max_events: int = 1000
    # A running turn whose owner stops appending for this long is considered dead: a new BeginTurn may
    # take it over, and followers stop waiting for it.
    turn_lease_seconds: float = 60
    # Redis (e.g. redis://:password@host:6379/0) makes sessions shared by every replica and survive
    # restarts; unset keeps them in this process's memory. A secret: it may carry a password.
    redis_url: SecretStr | None = None
    # Every key this service writes starts with this, so several deployments (or tests) can share a Redis.
    redis_key_prefix: str = "duplex:"
    # Per-user quotas; 0 means unlimited. Messages: a sliding one-minute window; tokens and audio: per
    # UTC day. Audio is the seconds heard and spoken in voice turns (an hour a day by default); once used
    # up, voice turns are refused until UTC midnight while text turns go on.
    quota_messages_per_minute: int = 30
    quota_tokens_per_day: int = 1_000_000
    quota_audio_seconds_per_day: int = 3600
    # history_service, where closed and expired sessions are recorded; empty disables recording.
    history_target: str = "127.0.0.1:50054"
    # First delay before retrying a failed recording; it doubles on each failure, up to 5 minutes.
    session_end_retry_seconds: float = 1.0
