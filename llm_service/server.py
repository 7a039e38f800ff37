"""Entrypoint of the LLM service: `python -m llm_service`.

Shaped like grpc's async_greeter_server_with_graceful_shutdown example: `main` reads the settings and
runs `serve`, which builds the server with `create_server` and stops it gracefully on SIGTERM/SIGINT.
"""

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, run_service, serve_until_signal
from duplex.common.settings import load_settings
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.providers import AnyProvider, LocalProvider, LocalSpeechProvider, OpenAIProvider, ProviderRegistry
from llm_service.resilience import ModelRouter
from llm_service.servicer import LlmServicer
from llm_service.settings import LlmSettings
from llm_service.vad import VadPool

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
PROCESS_NAME = "llm_service"
# The HTTP client libraries log every request URL at INFO (and more at DEBUG); a base URL may carry
# credentials, so they only speak up about trouble.
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")
# faster-whisper logs every transcription at INFO.
CHATTY_LOGGERS = ("faster_whisper",)


def build_providers(settings: LlmSettings, environ: Mapping[str, str] = os.environ) -> list[AnyProvider]:
    """Every configured provider; the built-in demo and the offline speech engines are always there, so
    the service works offline."""
    local = LocalProvider(
        tokens_per_second=settings.local_tokens_per_second,
        min_reply_tokens=settings.local_min_reply_tokens,
        tokens_per_chunk=settings.local_tokens_per_chunk,
    )
    speech = LocalSpeechProvider(max_concurrency=settings.speech_max_concurrency, threads=settings.speech_threads)
    openai_models = settings.openai_models(environ)
    if not openai_models:
        return [local, speech]
    return [local, speech, OpenAIProvider(openai_models, timeout_seconds=settings.llm_upstream_timeout_seconds)]


async def create_server(
    settings: LlmSettings, providers: Sequence[AnyProvider] | None = None, *, preload_speech: bool = False
) -> GrpcServer:
    """A started, SERVING server on settings.llm_listen; `providers` replaces the configured ones (tests).
    With `preload_speech`, the offline speech engines are loaded before it reports SERVING."""
    providers = build_providers(settings) if providers is None else list(providers)
    vad_pool = VadPool()
    try:
        server = build_server(providers, settings, vad_pool)
    except BaseException:
        await close_providers(providers)
        raise
    try:
        await server.start(settings.llm_listen)
        if preload_speech:
            await warm_up(providers, vad_pool)
    except BaseException:
        # Nothing else will stop a server that never started; stopping it closes the providers.
        await server.stop(grace=0)
        raise
    await server.set_serving(True)
    return server


def build_server(providers: Sequence[AnyProvider], settings: LlmSettings, vad_pool: VadPool) -> GrpcServer:
    registry = ProviderRegistry(
        providers,
        default_model=settings.resolved_default_model(),
        default_embedding_model=settings.resolved_default_embedding_model(),
        default_transcription_model=settings.default_transcription_model,
        default_speech_model=settings.default_speech_model,
    )
    log.info(
        "models: %s (default %s, transcription %s, speech %s)",
        ", ".join(model.name for model in registry.models()),
        registry.default_model,
        registry.default_transcription_model or "none",
        registry.default_speech_model or "none",
    )
    router = ModelRouter(registry, settings.retry_policy())
    servicer = LlmServicer(
        router,
        coalesce_window_seconds=settings.llm_coalesce_window_ms / 1000,
        speech_limits=settings.speech_limits(),
        vad_pool=vad_pool,
    )
    server = GrpcServer([SERVICE_NAME], partial(llm_pb2_grpc.add_LlmServiceServicer_to_server, servicer))
    for provider in providers:
        server.on_stop(provider.close)
    return server


async def warm_up(providers: Sequence[AnyProvider], vad_pool: VadPool) -> None:
    """Load the models of the providers that load any (the offline speech engines) and a VAD state."""
    started = asyncio.get_running_loop().time()
    await vad_pool.warm_up()
    for provider in providers:
        if isinstance(provider, LocalSpeechProvider):
            await provider.warm_up()
    log.info("speech engines loaded in %.1fs", asyncio.get_running_loop().time() - started)


async def close_providers(providers: Sequence[AnyProvider]) -> None:
    for provider in reversed(providers):
        await provider.close()


async def serve(settings: LlmSettings) -> None:
    server = await create_server(settings, preload_speech=settings.speech_preload)
    await serve_until_signal(server, settings.shutdown_grace_seconds, PROCESS_NAME)


def main() -> None:
    settings = load_settings(LlmSettings, PROCESS_NAME)
    configure_logging(settings.log_level, PROCESS_NAME)
    quiet_http_client_logs()
    run_service(serve(settings), settings)


def quiet_http_client_logs() -> None:
    for name in (*QUIET_LOGGERS, *CHATTY_LOGGERS):
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
