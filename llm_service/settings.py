"""Settings of the LLM service, read from DUPLEX_* environment variables."""

from pydantic import Field

from duplex.common.settings import ServiceSettings


class LlmSettings(ServiceSettings):
    llm_listen: str = "127.0.0.1:50052"
    # The model that answers requests naming none; must be served by a configured provider.
    default_model: str = "local-demo"
    # Pace of the built-in demo model, so streaming looks like a real model; 0 streams without pausing.
    local_tokens_per_second: float = Field(default=30.0, ge=0)
    # The demo pads its reply to at least this many tokens, so there is a stream worth watching.
    local_min_reply_tokens: int = Field(default=40, ge=1)
    # Tokens per chunk of the demo model; more per chunk means fewer gRPC messages under load.
    local_tokens_per_chunk: int = Field(default=1, ge=1)
