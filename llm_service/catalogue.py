"""The model catalogue: which OpenAI-compatible models the service offers, from configuration.

Entries come from DUPLEX_LLM_MODELS (a JSON list) and DUPLEX_LLM_MODELS_FILE (a JSON file holding the
same list); with OPENAI_API_KEY set, one more entry for OpenAI itself is added (DUPLEX_OPENAI_MODEL, at
OPENAI_BASE_URL if set). Entries never hold keys, only the name of the environment variable holding one.

An entry is a text model unless it says it transcribes (`/audio/transcriptions`, e.g. whisper-1 or
gpt-4o-transcribe) or speaks (`/audio/speech`, e.g. gpt-4o-mini-tts, with its voices); a speech entry
does not generate text unless it also says `"supports_generation": true`.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, field_validator, model_validator

from llm_service.providers.local import MODEL_NAME as LOCAL_MODEL_NAME
from llm_service.providers.local_speech import MODEL_NAMES as LOCAL_SPEECH_MODEL_NAMES
from llm_service.providers.openai_provider import DEFAULT_BASE_URL, OPENAI_PCM_SAMPLE_RATE, OpenAIModel

BUILT_IN_MODELS = (LOCAL_MODEL_NAME, *LOCAL_SPEECH_MODEL_NAMES)

# Sent to endpoints that need no key (a local vLLM or Ollama): the SDK insists on some key.
NO_KEY = "no-key"
OPENAI_KEY_VARIABLE = "OPENAI_API_KEY"


class ModelEntry(BaseModel):
    """One catalogue entry, e.g. {"name": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}."""

    # hide_input_in_errors: a key pasted into the catalogue by mistake must not reach a log.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # The public name clients ask for.
    name: str = Field(min_length=1)
    # The adapter; only OpenAI-compatible endpoints are configurable (local-demo is built in).
    provider: Literal["openai"] = "openai"
    # The model name the endpoint knows; defaults to `name`.
    upstream_model: str = ""
    # The endpoint's base URL, e.g. http://127.0.0.1:11434/v1 for Ollama.
    base_url: str = DEFAULT_BASE_URL
    # The environment variable holding the key; empty for endpoints that need none.
    api_key_env: str = ""
    description: str = ""
    # Models tried in order when this one stays unavailable after its retries.
    fallbacks: tuple[str, ...] = ()
    supports_tools: bool = True
    supports_embeddings: bool = False
    # OpenAI's reasoning models only accept "max_completion_tokens"; many other servers only "max_tokens".
    max_tokens_parameter: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # Whether Generate works with it; unset: unless it is a speech model (it transcribes or speaks).
    supports_generation: bool | None = None
    # Transcribe: the endpoint's /audio/transcriptions; with transcription_stream its text streams
    # (stream=true: gpt-4o-transcribe and gpt-4o-mini-transcribe do, whisper-1 does not), which gives
    # interim results.
    supports_transcription: bool = False
    transcription_stream: bool = False
    # Synthesize: the endpoint's /audio/speech, its voices (the first is the default; a speech model
    # needs at least one), and the rate of its "pcm" audio (OpenAI's is 24 kHz 16-bit mono).
    supports_speech: bool = False
    voices: tuple[str, ...] = ()
    speech_sample_rate: int = Field(default=OPENAI_PCM_SAMPLE_RATE, ge=8000, le=48000)

    @field_validator("name")
    @classmethod
    def _not_the_demo(cls, name: str) -> str:
        if name in BUILT_IN_MODELS:
            raise ValueError(f"{name} is built in and cannot be configured")
        return name

    @model_validator(mode="after")
    def _speech_needs_voices(self) -> "ModelEntry":
        if self.supports_speech and not self.voices:
            raise ValueError("a speech model needs its voices (the first is its default), e.g. [\"alloy\"]")
        return self

    @property
    def generates(self) -> bool:
        if self.supports_generation is not None:
            return self.supports_generation
        return not (self.supports_transcription or self.supports_speech)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, base_url: str) -> str:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return base_url.rstrip("/")


MODEL_LIST: TypeAdapter[list[ModelEntry]] = TypeAdapter(list[ModelEntry])


def read_catalogue_file(path: Path) -> list[ModelEntry]:
    return MODEL_LIST.validate_json(path.read_text(encoding="utf-8"))


def convenience_entry(model: str, base_url: str) -> ModelEntry:
    """OpenAI itself, for OPENAI_API_KEY alone."""
    return ModelEntry(
        name=model,
        upstream_model=model,
        base_url=base_url or DEFAULT_BASE_URL,
        api_key_env=OPENAI_KEY_VARIABLE,
        description=f"{model} via the OpenAI API (OPENAI_API_KEY)",
    )


def merge_catalogue(entries: Sequence[ModelEntry], convenience: ModelEntry | None) -> list[ModelEntry]:
    """The entries, plus the convenience one unless an entry of the same name overrides it."""
    merged = list(entries)
    names = [entry.name for entry in merged]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"the model catalogue names {', '.join(duplicates)} more than once")
    if convenience is not None and convenience.name not in names:
        merged.append(convenience)
    return merged


def resolve_models(entries: Sequence[ModelEntry], environ: Mapping[str, str] = os.environ) -> list[OpenAIModel]:
    """The entries with their keys read from the environment; ValueError naming the variable when one is unset."""
    return [
        OpenAIModel(
            name=entry.name,
            upstream_model=entry.upstream_model or entry.name,
            api_key=api_key(entry, environ),
            base_url=entry.base_url,
            description=entry.description,
            supports_tools=entry.supports_tools,
            supports_embeddings=entry.supports_embeddings,
            fallbacks=entry.fallbacks,
            max_tokens_parameter=entry.max_tokens_parameter,
            supports_generation=entry.generates,
            supports_transcription=entry.supports_transcription,
            transcription_stream=entry.transcription_stream,
            supports_speech=entry.supports_speech,
            voices=entry.voices,
            speech_sample_rate=entry.speech_sample_rate,
        )
        for entry in entries
    ]


def api_key(entry: ModelEntry, environ: Mapping[str, str]) -> SecretStr:
    if not entry.api_key_env:
        return SecretStr(NO_KEY)
    key = environ.get(entry.api_key_env, "").strip()
    if not key:
        raise ValueError(f"model {entry.name!r} reads its API key from {entry.api_key_env}, which is not set")
    return SecretStr(key)
