"""Entrypoint of the LLM service: `python -m llm_service`.

Shaped like grpc's async_greeter_server_with_graceful_shutdown example: `main` reads the settings and
runs `serve`, which builds the server with `create_server` and stops it gracefully on SIGTERM/SIGINT.
"""

import asyncio
from collections.abc import Sequence
from functools import partial

from duplex.common.logs import configure_logging
from duplex.common.server import GrpcServer, serve_until_signal
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.providers import LocalProvider, Provider, ProviderRegistry
from llm_service.servicer import LlmServicer
from llm_service.settings import LlmSettings

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
PROCESS_NAME = "llm_service"


def build_providers(settings: LlmSettings) -> list[Provider]:
    """Every configured provider; the built-in demo is always there, so the service works offline."""
    local = LocalProvider(
        tokens_per_second=settings.local_tokens_per_second,
        min_reply_tokens=settings.local_min_reply_tokens,
        tokens_per_chunk=settings.local_tokens_per_chunk,
    )
    return [local]


async def create_server(settings: LlmSettings, providers: Sequence[Provider] | None = None) -> GrpcServer:
    """A started, SERVING server on settings.llm_listen; `providers` replaces the configured ones (tests)."""
    providers = build_providers(settings) if providers is None else list(providers)
    try:
        server = build_server(providers, settings.default_model)
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


def build_server(providers: Sequence[Provider], default_model: str) -> GrpcServer:
    registry = ProviderRegistry(providers, default_model=default_model)
    servicer = LlmServicer(registry)
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
    asyncio.run(serve(settings))
