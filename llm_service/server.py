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
from duplex.common.server import GrpcServer, serve_until_signal
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.providers import LocalProvider, OpenAIProvider, Provider, ProviderRegistry
from llm_service.resilience import ModelRouter
from llm_service.servicer import LlmServicer
from llm_service.settings import LlmSettings

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
PROCESS_NAME = "llm_service"
# The HTTP client libraries log every request URL at INFO (and more at DEBUG); a base URL may carry
# credentials, so they only speak up about trouble.
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")


def build_providers(settings: LlmSettings, environ: Mapping[str, str] = os.environ) -> list[Provider]:
    """Every configured provider; the built-in demo is always there, so the service works offline."""
    local = LocalProvider(
        tokens_per_second=settings.local_tokens_per_second,
        min_reply_tokens=settings.local_min_reply_tokens,
        tokens_per_chunk=settings.local_tokens_per_chunk,
    )
    openai_models = settings.openai_models(environ)
    if not openai_models:
        return [local]
    return [local, OpenAIProvider(openai_models, timeout_seconds=settings.llm_upstream_timeout_seconds)]


async def create_server(settings: LlmSettings, providers: Sequence[Provider] | None = None) -> GrpcServer:
    """A started, SERVING server on settings.llm_listen; `providers` replaces the configured ones (tests)."""
    providers = build_providers(settings) if providers is None else list(providers)
    try:
        server = build_server(providers, settings)
    except BaseException:
        await close_providers(providers)
        raise
    try:
        await server.start(settings.llm_listen)
    except BaseException:
        # Nothing else will stop a server that never started; stopping it closes the providers.
        await server.stop(grace=0)
        raise
    await server.set_serving(True)
    return server


def build_server(providers: Sequence[Provider], settings: LlmSettings) -> GrpcServer:
    registry = ProviderRegistry(
        providers,
        default_model=settings.resolved_default_model(),
        default_embedding_model=settings.resolved_default_embedding_model(),
    )
    log.info("models: %s (default %s)", ", ".join(model.name for model in registry.models()), registry.default_model)
    router = ModelRouter(registry, settings.retry_policy())
    servicer = LlmServicer(router, coalesce_window_seconds=settings.llm_coalesce_window_ms / 1000)
    server = GrpcServer([SERVICE_NAME], partial(llm_pb2_grpc.add_LlmServiceServicer_to_server, servicer))
    for provider in providers:
        server.on_stop(provider.close)
    return server


async def close_providers(providers: Sequence[Provider]) -> None:
    for provider in reversed(providers):
        await provider.close()


async def serve(settings: LlmSettings) -> None:
    server = await create_server(settings)
    await serve_until_signal(server, settings.shutdown_grace_seconds, PROCESS_NAME)


def main() -> None:
    settings = LlmSettings()
    configure_logging(settings.log_level, PROCESS_NAME)
    quiet_http_client_logs()
    asyncio.run(serve(settings))


def quiet_http_client_logs() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
