"""Fixtures that start the real LLM server on port 0 and talk to it over a real grpc.aio channel."""

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
import pytest
from llm_helpers import TEST_KEY, TEST_KEY_VARIABLE, RunningLlm, make_settings

from duplex.llm.v1 import llm_pb2_grpc
from llm_service.providers import Provider
from llm_service.server import create_server
from llm_service.settings import LlmSettings
from tests.fake_openai import FakeOpenAI

StartLlm = Callable[..., Awaitable[RunningLlm]]


@pytest.fixture(autouse=True)
def _openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenAI settings leak in from the machine; the catalogue's test key is in the environment."""
    for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DUPLEX_OPENAI_MODEL", "DUPLEX_LLM_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(TEST_KEY_VARIABLE, TEST_KEY)


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on 127.0.0.1, a fresh port per test."""
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def start_llm() -> AsyncIterator[StartLlm]:
    """Starts servers (test settings and configured providers unless given) and stops them afterwards."""
    running: list[RunningLlm] = []

    async def start(settings: LlmSettings | None = None, providers: Sequence[Provider] | None = None) -> RunningLlm:
        server = await create_server(settings or make_settings(), providers)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        running.append(RunningLlm(server, channel, llm_pb2_grpc.LlmServiceStub(channel)))
        return running[-1]

    yield start
    for instance in reversed(running):
        await instance.channel.close()
        await instance.server.stop(grace=0)


@pytest.fixture
async def llm(start_llm: StartLlm) -> RunningLlm:
    return await start_llm()
