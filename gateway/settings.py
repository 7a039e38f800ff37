import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from duplex.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    gateway_listen: str = "127.0.0.1:50051"
    llm_target: str = "127.0.0.1:50052"
    session_target: str = "127.0.0.1:50053"
    history_target: str = "127.0.0.1:50054"
    # Without authentication (the embedded default) every caller is this one local user.
    local_user_id: str = "local"
    # JWT bearer authentication: one of a shared secret (HS256), a PEM public key or a JWKS file.
    jwt_secret: SecretStr | None = None
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_algorithms: list[str] = []
    jwt_audience: str = "duplex"
    jwt_issuer: str = "duplex"
    jwt_leeway_seconds: float = 30.0
    default_system_prompt: str = "You are Duplex, a helpful assistant. Answer clearly and concisely."
    # Deadline for one call to an inner service (a whole turn has its own).
    rpc_timeout_seconds: float = 10.0
    turn_timeout_seconds: float = 300.0
    max_message_chars: int = 32_000
    # Model calls per turn that may ask for tools; the call after the last one must answer in text.
    max_tool_rounds: int = 4
    tool_timeout_seconds: float = 10.0
    # How many earlier messages of the conversation the model sees (read back in one page of history).
    context_messages: int = Field(50, ge=1, le=1000)
    # Events reach the session log in batches at most this often.
    event_flush_interval_seconds: float = 0.02
    # Recent events kept in memory per active session, so same-replica resumes skip the session service.
    hub_buffer_events: int = Field(1024, ge=1)
    # ...and at most this many bytes of them: a spoken answer's audio events are large (about 48 KB per
    # second of speech), and older events are in the session log anyway.
    hub_buffer_bytes: int = Field(1 << 20, ge=0)
    # An answer's write as its turn ends waits this long for history; past it (or with history down) the
    # turn ends saying the answer is saved later, and it is written again until history takes it.
    answer_store_timeout_seconds: float = Field(3.0, gt=0)
    # A stream held back this long by a session log that takes nothing (the session service is down) ends
    # with a retryable UNAVAILABLE event, so its client resumes once the service is back.
    session_log_outage_seconds: float = Field(3.0, gt=0)
    # Events queued for one slow client before its follower waits.
    connection_outbox_events: int = 256
    dependency_check_interval_seconds: float = 5.0
    # A running turn that logged nothing for this long renews its lease (keep well under the session
    # service's DUPLEX_TURN_LEASE_SECONDS).
    turn_lease_renew_seconds: float = 5.0

    # Voice. The largest AudioInput (one WebSocket frame or SendAudio call), and one utterance's audio
    # (the whole of a WAV/WebM/Ogg recording, or PCM between commits).
    voice_max_audio_chunk_bytes: int = Field(1024 * 1024, ge=1024)
    voice_max_utterance_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # How long after its speech began an utterance may go on before it is refused.
    voice_max_utterance_seconds: float = Field(60.0, gt=0)
    # An utterance (or a hands-free listener) with no audio for this long is dropped.
    voice_input_idle_seconds: float = Field(30.0, gt=0)
    # Answer audio goes out paced to play-out time, at most this far ahead of it, and a spoken turn ends
    # once this much of its audio is left to play: the client's buffer stays short, a barge-in stops
    # speech still queued here, and an interrupt finds the turn running while its speech plays.
    voice_audio_lead_ms: int = Field(1000, ge=0)

    # The browser edge (gateway/web): WebSocket chat, grpc-web, the web page and /healthz on one HTTP port
    # of the gateway process. Empty turns it off.
    http_listen: str = "127.0.0.1:8080"
    # Origins whose pages may use the edge (checked on the WebSocket upgrade and for grpc-web CORS), comma
    # separated or a JSON list. Unset: the page's own origins, http://127.0.0.1:<port> and
    # http://localhost:<port>. Requests without an Origin header (non-browser clients) are always allowed.
    allowed_origins: Annotated[list[str] | None, NoDecode] = None
    # Largest WebSocket frame and grpc-web request message: room for max_message_chars of UTF-8 text.
    http_max_message_bytes: int = 131_072
    # WebSocket ping interval (a peer that misses the pong is dropped), the idle timeout (no frame either
    # way) and how long a client has to send its token frame when auth is on.
    ws_heartbeat_seconds: float = 20.0
    ws_idle_timeout_seconds: float = 300.0
    ws_auth_timeout_seconds: float = 10.0

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return value

    @model_validator(mode="after")
    def _default_algorithms(self) -> "GatewaySettings":
        if self.jwt_secret is not None and not self.jwt_secret.get_secret_value():
            self.jwt_secret = None  # an empty variable means "not set", not "sign with an empty key"
        if not self.jwt_algorithms:
            self.jwt_algorithms = ["HS256"] if self.jwt_secret is not None else ["RS256", "ES256", "EdDSA"]
        shared = sorted(a for a in self.jwt_algorithms if a.startswith("HS"))
        public = sorted(a for a in self.jwt_algorithms if not a.startswith("HS"))
        if shared and public:
            raise ValueError(f"DUPLEX_JWT_ALGORITHMS mixes shared-secret ({', '.join(shared)}) and public-key "
                             f"({', '.join(public)}) algorithms; list one kind, matching the key you configure")
        if public and self.jwt_secret is not None:
            raise ValueError("DUPLEX_JWT_ALGORITHMS lists public-key algorithms but DUPLEX_JWT_SECRET is a shared "
                             "secret; list HS256, HS384 or HS512")
        return self
