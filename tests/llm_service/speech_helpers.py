"""Plain helpers for the speech tests: request streams, collected Synthesize and Transcribe calls, audio."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from duplex.llm.v1 import llm_pb2, llm_pb2_grpc

FOX = "The quick brown fox jumps over the lazy dog."
PARK = "It is a sunny day in the park."
# Whisper's input rate, and Piper's joe voice's own.
RATE = 16000
VOICE_RATE = 22050


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def words_apart(heard: str, said: str) -> int:
    """How many words of `heard` differ from `said`, position by position (a missing or extra word counts)."""
    a, b = words(heard), words(said)
    return sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))


def pcm_seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / 2 / rate


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * round(seconds * rate))


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def transcribe_config(**fields: object) -> llm_pb2.TranscribeRequest:
    return llm_pb2.TranscribeRequest(config=llm_pb2.TranscribeConfig(**fields))


def synthesize_config(**fields: object) -> llm_pb2.SynthesizeRequest:
    return llm_pb2.SynthesizeRequest(config=llm_pb2.SynthesizeConfig(**fields))


def audio_format(encoding: int = llm_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz: int = 0) -> llm_pb2.AudioFormat:
    return llm_pb2.AudioFormat(encoding=encoding, sample_rate_hz=sample_rate_hz)


def audio_messages(audio: bytes, size: int = 3200) -> list[llm_pb2.TranscribeRequest]:
    return [llm_pb2.TranscribeRequest(audio=piece) for piece in pieces(audio, size)]


COMMIT = llm_pb2.TranscribeRequest(commit=llm_pb2.TranscribeCommit())


async def stream_of(messages: Iterable[object]) -> AsyncIterator[object]:
    for message in messages:
        yield message


@dataclass
class Speech:
    """A whole Synthesize stream, split into its parts."""

    responses: list[llm_pb2.SynthesizeResponse]

    @property
    def kinds(self) -> list[str]:
        return [response.WhichOneof("kind") for response in self.responses]

    @property
    def started(self) -> llm_pb2.SynthesizeStarted:
        return self.responses[0].started

    @property
    def chunks(self) -> list[llm_pb2.AudioChunk]:
        return [response.audio for response in self.responses if response.HasField("audio")]

    @property
    def finished(self) -> llm_pb2.SynthesizeFinished:
        return self.responses[-1].finished

    @property
    def pcm(self) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(chunk.text_start, chunk.text_end) for chunk in self.chunks]


async def synthesize(
    stub: llm_pb2_grpc.LlmServiceStub, texts: Sequence[str], timeout: float = 30, **config: object
) -> Speech:
    messages = [synthesize_config(**config), *(llm_pb2.SynthesizeRequest(text=text) for text in texts)]
    return Speech([response async for response in stub.Synthesize(stream_of(messages), timeout=timeout)])


async def transcribe(
    stub: llm_pb2_grpc.LlmServiceStub, messages: Sequence[llm_pb2.TranscribeRequest], timeout: float = 30
) -> list[llm_pb2.TranscribeResponse]:
    return [response async for response in stub.Transcribe(stream_of(messages), timeout=timeout)]


def kinds(responses: Sequence[llm_pb2.TranscribeResponse]) -> list[str]:
    return [response.WhichOneof("kind") for response in responses]


def transcripts(responses: Sequence[llm_pb2.TranscribeResponse], final: bool | None = None) -> list[llm_pb2.Transcript]:
    found = [response.transcript for response in responses if response.HasField("transcript")]
    return [transcript for transcript in found if final is None or transcript.final == final]


async def read_all(call: grpc.aio.StreamStreamCall) -> list:
    """The rest of a call read with read() (a call read so cannot be iterated any more)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


class RequestQueue:
    """A request stream the test writes to while the call runs; close() half-closes it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()

    def send(self, message: object) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[object]:
        while (message := await self._queue.get()) is not None:
            yield message
