"""Plain helpers for the LLM service tests: settings, message builders, a collected Generate stream."""

from dataclasses import dataclass

import grpc

from duplex.common.server import GrpcServer
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from llm_service.settings import LlmSettings


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
    }
    values.update(overrides)
    return LlmSettings(**values)


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


def request(*messages: llm_pb2.Message, model: str = "", max_tokens: int = 0) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model=model, messages=messages, max_tokens=max_tokens)


async def collect(stub: llm_pb2_grpc.LlmServiceStub, generate_request: llm_pb2.GenerateRequest) -> Reply:
    return Reply([response async for response in stub.Generate(generate_request, timeout=10)])


def user(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_USER, content=content)


def assistant(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=content)


def system(content: str) -> llm_pb2.Message:
    return llm_pb2.Message(role=llm_pb2.ROLE_SYSTEM, content=content)
