"""Plain helpers for the LLM service tests: settings, message builders, a collected Generate stream."""

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from duplex.common.server import GrpcServer
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.catalogue import ModelEntry
from llm_service.settings import LlmSettings
from tests.fake_openai import FakeOpenAI

# The key of the test catalogue's models, in the environment variable the catalogue names.
TEST_KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
TEST_KEY_VARIABLE = "DUPLEX_TEST_OPENAI_KEY"


def make_settings(**overrides: object) -> LlmSettings:
    """Explicit values, so DUPLEX_* variables of the machine running the tests change nothing."""
    values: dict[str, object] = {
        "llm_listen": "127.0.0.1:0",
        "default_model": "local-demo",
        # Unpaced by default so the folder stays fast; the pacing tests set their own rate.
        "local_tokens_per_second": 0.0,
        "local_min_reply_tokens": 40,
        "local_tokens_per_chunk": 1,
        "shutdown_grace_seconds": 0.0,
        # One message per chunk unless a test is about coalescing, so chunks can be counted.
        "llm_coalesce_window_ms": 0.0,
        # No OpenAI model sneaks in from the machine's OPENAI_API_KEY, and no catalogue.
        "openai_api_key": None,
        "llm_models": [],
        "llm_models_file": None,
        # Retries fast enough for tests; tests of the backoff set their own.
        "llm_retry_base_delay_seconds": 0.01,
        "llm_retry_max_delay_seconds": 2.0,
    }
    values.update(overrides)
    return LlmSettings(**values)


def fake_model(fake: FakeOpenAI, name: str = "fake-gpt", **fields: object) -> ModelEntry:
    """A catalogue entry for a model served by the fake OpenAI server."""
    values: dict[str, object] = {
        "name": name,
        "upstream_model": f"upstream-{name}",
        "base_url": fake.base_url,
        "api_key_env": TEST_KEY_VARIABLE,
        "supports_embeddings": True,
    }
    values.update(fields)
    return ModelEntry.model_validate(values)


def openai_settings(models: Sequence[ModelEntry], **overrides: object) -> LlmSettings:
    """Test settings serving `models` (the first one by default) next to local-demo."""
    values: dict[str, object] = {"llm_models": list(models), "default_model": models[0].name}
    values.update(overrides)
    return make_settings(**values)


@dataclass
class RunningLlm:
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: llm_pb2_grpc.LlmServiceStub


@dataclass
class Reply:
    """A whole Generate stream, split into its parts."""

    responses: list[llm_pb2.GenerateResponse]

    @property
    def kinds(self) -> list[str]:
        return [response.WhichOneof("kind") for response in self.responses]

    @property
    def started(self) -> llm_pb2.GenerateStarted:
        return self.responses[0].started

    @property
    def chunks(self) -> list[llm_pb2.TextChunk]:
        return [response.chunk for response in self.responses if response.HasField("chunk")]

    @property
    def finished(self) -> llm_pb2.GenerateFinished:
        return self.responses[-1].finished

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def tool_calls(self) -> list[llm_pb2.ToolCall]:
        return [response.tool_call for response in self.responses if response.HasField("tool_call")]


def request(
    *messages: llm_pb2.Message, model: str = "", max_tokens: int = 0, tools: Sequence[llm_pb2.ToolDefinition] = ()
) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model=model, messages=messages, max_tokens=max_tokens, tools=tools)


async def collect(stub: llm_pb2_grpc.LlmServiceStub, generate_request: llm_pb2.GenerateRequest) -> Reply:
    return Reply([response async for response in stub.Generate(generate_request, timeout=10)])


def user(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_USER, content=content)


def assistant(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=content)


def system(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_SYSTEM, content=content)


def tool_result(call: llm_pb2.ToolCall, content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_TOOL, content=content, tool_call_id=call.id, name=call.name)


def calling(*calls: llm_pb2.ToolCall, content: str = "") -> llm_pb2.Message:
    """The assistant message that asked for `calls`."""
    return llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=content, tool_calls=calls)


def tool(
    name: str, schema: str = '{"type": "object", "properties": {}}', description: str = ""
) -> llm_pb2.ToolDefinition:
    return llm_pb2.ToolDefinition(name=name, description=description, parameters_json_schema=schema)


# The gateway's built-in tools, as it offers them.
CALCULATOR = tool(
    "calculator",
    '{"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}',
    "Evaluate an arithmetic expression.",
)
CURRENT_TIME = tool("current_time", description="The current date and time.")
SEARCH_HISTORY = tool(
    "search_history",
    '{"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}',
    "Search the user's earlier conversations.",
)
BUILTIN_TOOLS = (CURRENT_TIME, CALCULATOR, SEARCH_HISTORY)
