"""Per-user quotas: messages per minute, tokens per UTC day and audio seconds per UTC day.

Both backends implement the same rules; the memory store uses `MemoryQuotas`, the Redis store the same
rules in Lua (session_service/redis_scripts.py).

- Messages: a SLIDING one-minute window (a log of message times per user). A BeginTurn that starts a
  new turn counts one message; it is refused while the user already sent `messages_per_minute` messages
  in the last 60 s, with retry_after = when the oldest of them leaves the window.
- Tokens: a counter per user and UTC day, fed by EndTurn(tokens) once per turn. A BeginTurn is refused
  while the day's count has reached `tokens_per_day`, with retry_after = time until UTC midnight. A turn
  may overshoot the limit (its size is only known at its end); the next one is refused.
- Audio: the same as tokens, in milliseconds, fed by EndTurn(audio_ms), but only a BeginTurn that uses
  audio (hears or speaks it) is refused once the day's audio is used up; text turns never are. What is
  left is reported in whole seconds rounded UP, so it reads 0 exactly when audio turns are refused.
- A limit of 0 means unlimited; the remaining amount is then reported as None.
"""

import math
from collections import deque
from dataclasses import dataclass

from duplex.common.errors import QuotaViolation, ResourceExhausted

MESSAGE_WINDOW_SECONDS = 60.0
DAY_SECONDS = 86_400.0
# A retry-after of 0 would not travel at all (duplex.common.errors sends none); never promise "right now".
MIN_RETRY_AFTER_SECONDS = 0.001


@dataclass(frozen=True)
class QuotaLimits:
    """0 means unlimited."""

    messages_per_minute: int = 0
    tokens_per_day: int = 0
    audio_seconds_per_day: int = 0

    @property
    def audio_ms_per_day(self) -> int:
        """Audio is counted in milliseconds (what EndTurn reports); the limit is set in seconds."""
        return self.audio_seconds_per_day * 1000


NO_LIMITS = QuotaLimits()


@dataclass(frozen=True)
class QuotaStatus:
    """What is left after the current message; None when that quota is unlimited."""

    messages_remaining: int | None
    tokens_remaining: int | None
    audio_seconds_remaining: int | None = None


def utc_day(now: float) -> int:
    """Days since the epoch: the epoch is UTC midnight, so this flips exactly at UTC midnight."""
    return math.floor(now / DAY_SECONDS)


def seconds_until_utc_midnight(now: float) -> float:
    return (utc_day(now) + 1) * DAY_SECONDS - now


def _exhausted(message: str, retry_after: float, quota_id: str, metric: str, limit: int) -> ResourceExhausted:
    """A refusal with when to retry and which quota (google.rpc.RetryInfo and QuotaFailure on the status)."""
    return ResourceExhausted(
        message,
        retry_after=max(MIN_RETRY_AFTER_SECONDS, retry_after),
        quota_violations=[QuotaViolation("user", message, quota_id, metric, limit)],
    )


def messages_exhausted(limit: int, retry_after: float) -> ResourceExhausted:
    return _exhausted(f"message quota exhausted: {limit} messages per minute", retry_after,
                      "MessagesPerMinutePerUser", "duplex/messages", limit)


def tokens_exhausted(limit: int, retry_after: float) -> ResourceExhausted:
    return _exhausted(f"daily token quota exhausted: {limit} tokens per day", retry_after,
                      "TokensPerDayPerUser", "duplex/tokens", limit)


def audio_exhausted(limit_seconds: int, retry_after: float) -> ResourceExhausted:
    return _exhausted(f"daily audio quota exhausted: {limit_seconds} seconds of audio per day", retry_after,
                      "AudioSecondsPerDayPerUser", "duplex/audio_seconds", limit_seconds)


def remaining(limit: int, used: int) -> int | None:
    return None if limit <= 0 else max(0, limit - used)


def audio_seconds_remaining(limit_seconds: int, used_ms: int) -> int | None:
    """Rounded up: 0 only once nothing is left, i.e. exactly when an audio turn is refused."""
    if limit_seconds <= 0:
        return None
    return max(0, -(-(limit_seconds * 1000 - used_ms) // 1000))


class MemoryQuotas:
    """The memory store's quota book. Not thread-safe; it lives on the event loop like the store."""

    def __init__(self, limits: QuotaLimits) -> None:
        self._limits = limits
        self._sent: dict[str, deque[float]] = {}  # user -> times of the messages in the window, oldest first
        self._tokens: dict[str, tuple[int, int]] = {}  # user -> (utc day, tokens used that day)
        self._audio: dict[str, tuple[int, int]] = {}  # user -> (utc day, audio milliseconds used that day)

    def check(self, user_id: str, now: float, *, uses_audio: bool = False) -> None:
        """Raise ResourceExhausted if the user may not send a message now. Changes nothing."""
        tokens_limit = self._limits.tokens_per_day
        if tokens_limit > 0 and self._tokens_used(user_id, now) >= tokens_limit:
            raise tokens_exhausted(tokens_limit, seconds_until_utc_midnight(now))
        audio_limit_ms = self._limits.audio_ms_per_day
        if uses_audio and audio_limit_ms > 0 and self._audio_used(user_id, now) >= audio_limit_ms:
            raise audio_exhausted(self._limits.audio_seconds_per_day, seconds_until_utc_midnight(now))
        messages_limit = self._limits.messages_per_minute
        sent = self._window(user_id, now)
        if messages_limit > 0 and len(sent) >= messages_limit:
            raise messages_exhausted(messages_limit, sent[0] + MESSAGE_WINDOW_SECONDS - now)

    def count_message(self, user_id: str, now: float) -> QuotaStatus:
        """Count one message (after `check` passed) and return what is left."""
        if self._limits.messages_per_minute > 0:
            self._sent.setdefault(user_id, deque()).append(now)
        return self.status(user_id, now)

    def give_back_message(self, user_id: str, counted_at: float | None) -> None:
        """Uncount a message counted at `counted_at` (its turn never answered), if still in the window."""
        sent = self._sent.get(user_id)
        if sent is not None and counted_at in sent:
            sent.remove(counted_at)

    def status(self, user_id: str, now: float) -> QuotaStatus:
        return QuotaStatus(
            messages_remaining=remaining(self._limits.messages_per_minute, len(self._window(user_id, now))),
            tokens_remaining=remaining(self._limits.tokens_per_day, self._tokens_used(user_id, now)),
            audio_seconds_remaining=audio_seconds_remaining(
                self._limits.audio_seconds_per_day, self._audio_used(user_id, now)
            ),
        )

    def add_tokens(self, user_id: str, tokens: int, now: float) -> None:
        if tokens > 0:
            self._tokens[user_id] = (utc_day(now), self._tokens_used(user_id, now) + tokens)

    def add_audio(self, user_id: str, audio_ms: int, now: float) -> None:
        if audio_ms > 0:
            self._audio[user_id] = (utc_day(now), self._audio_used(user_id, now) + audio_ms)

    def forget_idle(self, now: float) -> None:
        """Drop users with nothing in the window and no tokens or audio today, so the book does not grow
        forever."""
        for user_id in list(self._sent):
            if not self._window(user_id, now):
                del self._sent[user_id]
        today = utc_day(now)
        for daily in (self._tokens, self._audio):
            for user_id, (day, _) in list(daily.items()):
                if day != today:
                    del daily[user_id]

    def _window(self, user_id: str, now: float) -> deque[float]:
        sent = self._sent.get(user_id, deque())
        while sent and sent[0] <= now - MESSAGE_WINDOW_SECONDS:
            sent.popleft()
        return sent

    def _tokens_used(self, user_id: str, now: float) -> int:
        return _used_today(self._tokens, user_id, now)

    def _audio_used(self, user_id: str, now: float) -> int:
        return _used_today(self._audio, user_id, now)


def _used_today(daily: dict[str, tuple[int, int]], user_id: str, now: float) -> int:
    day, used = daily.get(user_id, (-1, 0))
    return used if day == utc_day(now) else 0
