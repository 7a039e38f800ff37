"""session_service's settings, read from DUPLEX_* environment variables."""

from urllib.parse import urlsplit

from pydantic import SecretStr, model_validator

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
    # True: redis_url names one node of a Redis Cluster (redis:// or rediss://, database 0); the client
    # finds the others. Every script touches one hash slot, so the same keys and scripts serve both.
    redis_cluster: bool = False
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

    @model_validator(mode="after")
    def _cluster_needs_a_cluster_url(self) -> "SessionSettings":
        if not self.redis_cluster:
            return self
        if self.redis_url is None:
            raise ValueError("DUPLEX_REDIS_CLUSTER needs DUPLEX_REDIS_URL (one node of the cluster)")
        url = urlsplit(self.redis_url.get_secret_value())
        if url.scheme not in ("redis", "rediss"):
            raise ValueError(f"DUPLEX_REDIS_URL: a Redis Cluster is reached over redis:// or rediss://, not {url.scheme}://")
        if url.path.strip("/") not in ("", "0"):
            raise ValueError("DUPLEX_REDIS_URL: a Redis Cluster has only database 0")
        # A brace in the prefix would become every key's hash tag: all keys in one slot (and one node).
        if "{" in self.redis_key_prefix or "}" in self.redis_key_prefix:
            raise ValueError("DUPLEX_REDIS_KEY_PREFIX may not contain { or } on a Redis Cluster")
        return self
