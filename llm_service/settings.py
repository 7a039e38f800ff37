"""Settings of the LLM service, read from DUPLEX_* environment variables (and OPENAI_API_KEY / OPENAI_BASE_URL)."""

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from duplex.common.settings import ServiceSettings
from llm_service.catalogue import (
    OPENAI_KEY_VARIABLE,
    ModelEntry,
    convenience_entry,
    merge_catalogue,
    read_catalogue_file,
    resolve_models,
)
from llm_service.providers.local import MODEL_NAME as LOCAL_MODEL_NAME
from llm_service.providers.local_speech import PIPER_MODEL, WHISPER_MODEL
from llm_service.providers.openai_provider import OpenAIModel
from llm_service.resilience import RetryPolicy
from llm_service.transcription import MIB, SpeechLimits


class LlmSettings(ServiceSettings):
    # populate_by_name: tests set the OPENAI_* fields by name, whatever the machine's environment holds.
    model_config = SettingsConfigDict(env_prefix="DUPLEX_", extra="ignore", populate_by_name=True)

    llm_listen: str = "127.0.0.1:50052"
    # The model that answers requests naming none; empty: the OPENAI_API_KEY model when that key is
    # set, else local-demo. Must be served by a configured provider.
    default_model: str = ""
    # The model Embed uses when a request names none; empty: local-demo.
    default_embedding_model: str = ""
    # The models Transcribe and Synthesize use when a request names none. They stay the offline engines
    # even with OPENAI_API_KEY set (that key only adds a text model): name a catalogue entry to change it.
    default_transcription_model: str = WHISPER_MODEL
    default_speech_model: str = PIPER_MODEL
    # Pace of the built-in demo model, so streaming looks like a real model; 0 streams without pausing.
    local_tokens_per_second: float = Field(default=30.0, ge=0)
    # The demo pads its reply to at least this many tokens, so there is a stream worth watching.
    local_min_reply_tokens: int = Field(default=40, ge=1)
    # Tokens per chunk of the demo model; more per chunk means fewer gRPC messages under load.
    local_tokens_per_chunk: int = Field(default=1, ge=1)

    # The model catalogue: a JSON list of llm_service.catalogue.ModelEntry, inline and/or in a file.
    llm_models: list[ModelEntry] = Field(default_factory=list)
    llm_models_file: Path | None = None
    # OpenAI with no catalogue at all: a key adds `openai_model` and makes it the default model.
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices(OPENAI_KEY_VARIABLE))
    openai_base_url: str = Field(default="", validation_alias=AliasChoices("OPENAI_BASE_URL"))
    openai_model: str = "gpt-4o-mini"

    # Before a reply's first token, failed upstream attempts are retried: this many attempts per model
    # (the first included), with exponential backoff and full jitter between base and max delay.
    llm_retry_max_attempts: int = Field(default=3, ge=1)
    llm_retry_base_delay_seconds: float = Field(default=0.25, ge=0)
    llm_retry_max_delay_seconds: float = Field(default=8.0, ge=0)
    # The longest wait for an upstream's next bytes (connecting, the first token, between tokens).
    llm_upstream_timeout_seconds: float = Field(default=60.0, gt=0)
    # Text chunks arriving within this window leave as one message; 0 sends one message per chunk. At
    # 50 ms a reader sees 20 updates a second, and a 50 tokens/s stream needs a third of the messages.
    llm_coalesce_window_ms: float = Field(default=50.0, ge=0)

    # The offline speech engines (local-whisper, local-piper): engine jobs at once in this process, the
    # threads each job uses, and whether `python -m llm_service` loads them before it reports SERVING
    # (otherwise the first call that needs one waits for it to load, about a second).
    speech_max_concurrency: int = Field(default=2, ge=1, le=16)
    speech_threads: int = Field(default=1, ge=1, le=16)
    speech_preload: bool = True
    # Transcribe: server VAD ends an utterance after this much silence (OpenAI's default), an utterance
    # may last this long and hold this many bytes (server VAD cuts it there instead), and one audio
    # message may hold this many bytes (gRPC itself refuses messages over 4 MiB).
    speech_vad_silence_ms: int = Field(default=500, ge=100, le=10_000)
    speech_max_utterance_seconds: float = Field(default=60.0, gt=0, le=600)
    speech_max_utterance_bytes: int = Field(default=8 * MIB, ge=1024)
    speech_max_audio_message_bytes: int = Field(default=1 * MIB, ge=1024, le=4 * MIB - 1024)
    # Interim results of models that cannot stream them: the utterance so far is transcribed again
    # after this much more speech, when the engine is idle.
    speech_interim_interval_ms: int = Field(default=1000, ge=100)

    @property
    def openai_key_is_set(self) -> bool:
        return bool(self.openai_api_key and self.openai_api_key.get_secret_value().strip())

    def catalogue(self) -> list[ModelEntry]:
        entries = list(self.llm_models)
        if self.llm_models_file is not None:
            entries += read_catalogue_file(self.llm_models_file)
        convenience = convenience_entry(self.openai_model, self.openai_base_url) if self.openai_key_is_set else None
        return merge_catalogue(entries, convenience)

    def openai_models(self, environ: Mapping[str, str] = os.environ) -> list[OpenAIModel]:
        """The catalogue with keys resolved; OPENAI_API_KEY comes from these settings when they hold it."""
        if self.openai_key_is_set:
            assert self.openai_api_key is not None
            environ = {**environ, OPENAI_KEY_VARIABLE: self.openai_api_key.get_secret_value()}
        return resolve_models(self.catalogue(), environ)

    def resolved_default_model(self) -> str:
        if self.default_model:
            return self.default_model
        return self.openai_model if self.openai_key_is_set else LOCAL_MODEL_NAME

    def resolved_default_embedding_model(self) -> str:
        return self.default_embedding_model or LOCAL_MODEL_NAME

    def speech_limits(self) -> SpeechLimits:
        return SpeechLimits(
            max_utterance_seconds=self.speech_max_utterance_seconds,
            max_utterance_bytes=self.speech_max_utterance_bytes,
            max_audio_message_bytes=self.speech_max_audio_message_bytes,
            vad_silence_ms=self.speech_vad_silence_ms,
            interim_interval_seconds=self.speech_interim_interval_ms / 1000,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.llm_retry_max_attempts,
            base_delay=self.llm_retry_base_delay_seconds,
            max_delay=self.llm_retry_max_delay_seconds,
        )
