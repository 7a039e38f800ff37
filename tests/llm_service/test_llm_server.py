"""The server around the servicer: model routing, provider failures, health, reflection, lifecycle."""

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llm_helpers import RunningLlm, collect, make_settings, request, user

from duplex.common.errors import Unavailable
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.providers import (
    Chunk,
    Finished,
    FinishReason,
    GenerationRequest,
    LocalProvider,
    ModelDescription,
    ProviderRegistry,
    Started,
    StreamItem,
)
from llm_service.server import create_server

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


class ScriptedProvider:
    """Serves one model by playing back fixed items, then raising `error` if given."""

    def __init__(self, model: str, items: Sequence[StreamItem] = (), error: BaseException | None = None):
        self.name = "scripted"
        self._model = model
        self._items = items
        self._error = error
        self.requests: list[GenerationRequest] = []
        self.closed = asyncio.Event()

    def models(self) -> list[ModelDescription]:
        return [ModelDescription(name=self._model, provider=self.name, description="plays back a script")]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.requests.append(request)
        for item in self._items:
            yield item
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        self.closed.set()


def local_provider() -> LocalProvider:
    return LocalProvider(tokens_per_second=0, min_reply_tokens=40)


WELL_BEHAVED = (
    Started(model="scripted", prompt_tokens=1),
    Chunk(text="Hello ", token_count=1),
    Chunk(text="there.", token_count=1),
    Finished(finish_reason=FinishReason.CONTENT_FILTER, prompt_tokens=1, completion_tokens=2),
)


async def test_list_models_lists_every_provider_model_and_the_default(start_llm):
    running = await start_llm(providers=[local_provider(), ScriptedProvider("scripted")])

    listing = await running.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)

    assert listing.default_model == "local-demo"
    assert [(model.name, model.provider) for model in listing.models] == [
        ("local-demo", "local"),
        ("scripted", "scripted"),
    ]
    assert "demo" in listing.models[0].description


async def test_a_model_name_is_routed_to_its_provider(start_llm):
    scripted = ScriptedProvider("scripted", WELL_BEHAVED)
    running = await start_llm(providers=[local_provider(), scripted])

    reply = await collect(running.stub, request(user("Hi"), model="scripted", max_tokens=7))

    assert reply.text == "Hello there."
    assert reply.finished.finish_reason == llm_pb2.FINISH_REASON_CONTENT_FILTER
    [routed] = scripted.requests
    assert (routed.model, routed.max_tokens, routed.messages[0].content) == ("scripted", 7, "Hi")


async def test_a_provider_domain_error_keeps_its_status(start_llm):
    failing = ScriptedProvider("scripted", WELL_BEHAVED[:2], Unavailable("upstream is down"))
    running = await start_llm(providers=[local_provider(), failing])

    call = running.stub.Generate(request(user("Hi"), model="scripted"), timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in call:
            received.append(response.WhichOneof("kind"))

    assert received == ["started", "chunk"]
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "upstream is down"


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param(ScriptedProvider("scripted", WELL_BEHAVED[:1], RuntimeError("secret")), id="crash"),
        pytest.param(ScriptedProvider("scripted", WELL_BEHAVED[:3]), id="no finished"),
        pytest.param(ScriptedProvider("scripted", WELL_BEHAVED[1:]), id="no started"),
        pytest.param(ScriptedProvider("scripted", WELL_BEHAVED + WELL_BEHAVED[1:2]), id="after finished"),
    ],
)
async def test_a_broken_provider_is_an_internal_error_without_details(start_llm, provider):
    running = await start_llm(providers=[local_provider(), provider])

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(running.stub, request(user("Hi"), model="scripted"))

    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (failure.value.details() or "")


@pytest.mark.parametrize("service", ["", "duplex.llm.v1.LlmService"])
async def test_health_is_serving(llm: RunningLlm, service: str):
    health = health_pb2_grpc.HealthStub(llm.channel)

    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(llm: RunningLlm):
    reflection = reflection_pb2_grpc.ServerReflectionStub(llm.channel)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))

    reply = await call.read()
    call.cancel()

    names = {service.name for service in reply.list_services_response.service}
    assert {"duplex.llm.v1.LlmService", "grpc.health.v1.Health"} <= names


async def test_stopping_the_server_closes_the_providers():
    scripted = ScriptedProvider("scripted")
    server = await create_server(make_settings(), [local_provider(), scripted])

    await server.stop(grace=0)

    assert scripted.closed.is_set()


async def test_a_server_that_cannot_listen_closes_its_providers():
    scripted = ScriptedProvider("scripted")

    with pytest.raises(RuntimeError):
        await create_server(make_settings(llm_listen="256.0.0.1:1"), [local_provider(), scripted])

    assert scripted.closed.is_set()


def test_two_providers_cannot_serve_the_same_model():
    with pytest.raises(ValueError, match="two providers"):
        ProviderRegistry([ScriptedProvider("same"), ScriptedProvider("same")], default_model="same")


async def test_a_default_model_nobody_serves_fails_at_startup_and_closes_the_providers():
    scripted = ScriptedProvider("scripted")

    with pytest.raises(ValueError, match="default model 'gpt-nope'"):
        await create_server(make_settings(default_model="gpt-nope"), [local_provider(), scripted])

    assert scripted.closed.is_set()


async def test_python_dash_m_serves_until_sigterm():
    environment = {
        **os.environ,
        "DUPLEX_LLM_LISTEN": "127.0.0.1:0",
        "DUPLEX_LOCAL_TOKENS_PER_SECOND": "0",
        "DUPLEX_SHUTDOWN_GRACE_SECONDS": "0",
        "DUPLEX_LOG_LEVEL": "INFO",
    }
    command = (sys.executable, "-m", "llm_service")
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPOSITORY_ROOT, env=environment, stderr=asyncio.subprocess.PIPE
    )
    try:
        port = await asyncio.wait_for(read_listening_port(process), timeout=10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await collect(llm_pb2_grpc.LlmServiceStub(channel), request(user("Hi")))
        assert reply.kinds[-1] == "finished"

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_listening_port(process: asyncio.subprocess.Process) -> int:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if match := re.search(rb"listening on port (\d+)", line):
            return int(match.group(1))
    raise AssertionError("the service exited before listening")
