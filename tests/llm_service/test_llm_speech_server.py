"""What Transcribe and Synthesize refuse, and how: INVALID_ARGUMENT with a clear message, never a hang.

None of these reach a model, so they run fast; the bounds are set small where a test needs them."""

import grpc
import pytest
from llm_helpers import collect, make_settings, request, user
from speech_helpers import (
    COMMIT,
    RequestQueue,
    audio_format,
    audio_messages,
    silence,
    stream_of,
    synthesize_config,
    transcribe_config,
)

from duplex.llm.v1 import llm_pb2
from llm_service.audio import wav_file

TEXT = llm_pb2.SynthesizeRequest(text="Hello.")
AUDIO = llm_pb2.TranscribeRequest(audio=silence(0.1))
VAD = llm_pb2.TURN_DETECTION_SERVER_VAD


async def call_fails(call) -> grpc.aio.AioRpcError:
    """The call's error, once it ends (it must end, and fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:
            pass
    return failure.value


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        pytest.param([], "the call ended before its config", id="no messages"),
        pytest.param([AUDIO], "the first TranscribeRequest must carry config", id="audio first"),
        pytest.param([llm_pb2.TranscribeRequest()], "must carry config", id="an empty message first"),
        pytest.param([transcribe_config(), transcribe_config()], "config comes once", id="config twice"),
        pytest.param(
            [transcribe_config(), llm_pb2.TranscribeRequest()], "must carry config, audio or commit", id="empty"
        ),
        pytest.param(
            [transcribe_config(format=audio_format(encoding=99))],
            "format.encoding 99 is not a known AudioEncoding",
            id="unknown encoding",
        ),
        pytest.param(
            [transcribe_config(format=audio_format(sample_rate_hz=7999))],
            "format.sample_rate_hz is 7999 Hz; it must be between 8000 and 48000",
            id="rate too low",
        ),
        pytest.param(
            [transcribe_config(format=audio_format(sample_rate_hz=96000))], "96000 Hz", id="rate too high"
        ),
        pytest.param(
            [transcribe_config(format=audio_format(llm_pb2.AUDIO_ENCODING_WAV), turn_detection=VAD)],
            "server VAD needs PCM16 audio",
            id="server vad on wav",
        ),
        pytest.param([transcribe_config(turn_detection=7)], "turn_detection 7", id="unknown turn detection"),
        pytest.param([transcribe_config(language="fr")], "'local-whisper' transcribes en only", id="not english"),
        pytest.param([transcribe_config(language="English")], "not an ISO 639-1 code", id="not a language code"),
        pytest.param(
            [transcribe_config(model="local-demo")], "'local-demo' does not support transcription", id="a text model"
        ),
        pytest.param(
            [transcribe_config(model="local-piper")], "'local-piper' does not support transcription", id="a voice"
        ),
        pytest.param(
            [transcribe_config(), llm_pb2.TranscribeRequest(audio=bytes(1024 * 1024 + 1))],
            "an audio message holds 1048577 bytes; the limit is 1048576",
            id="a message too big",
        ),
        pytest.param(
            [transcribe_config(format=audio_format(llm_pb2.AUDIO_ENCODING_WEBM_OPUS)), AUDIO, COMMIT],
            "the audio is not readable WebM Opus",
            id="not webm",
        ),
        pytest.param(
            [transcribe_config(format=audio_format(llm_pb2.AUDIO_ENCODING_OGG_OPUS)), AUDIO],
            "the audio is not readable Ogg Opus",
            id="not ogg, at the half-close",
        ),
        pytest.param(
            [transcribe_config(format=audio_format(llm_pb2.AUDIO_ENCODING_WAV)), AUDIO, COMMIT],
            "the audio is not a readable PCM WAV file",
            id="not wav",
        ),
    ],
)
async def test_transcribe_refuses(llm, messages: list, detail: str):
    failure = await call_fails(llm.stub.Transcribe(stream_of(messages), timeout=10))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.details()


async def test_transcribe_with_an_unknown_model_is_not_found(llm):
    failure = await call_fails(llm.stub.Transcribe(stream_of([transcribe_config(model="nope")]), timeout=10))

    assert (failure.code(), failure.details()) == (grpc.StatusCode.NOT_FOUND, "model 'nope' not found")


@pytest.mark.parametrize(
    ("limits", "audio", "detail"),
    [
        pytest.param(
            {"speech_max_utterance_seconds": 1.0}, silence(1.5), "plays longer than the limit of 1 seconds", id="time"
        ),
        pytest.param(
            {"speech_max_utterance_bytes": 4096}, silence(0.2), "more than the limit of 4096 bytes", id="bytes"
        ),
    ],
)
async def test_an_utterance_over_a_limit_is_refused_as_it_arrives(start_llm, limits: dict, audio: bytes, detail: str):
    running = await start_llm(make_settings(**limits))
    # Never half-closed: the refusal cannot wait for the end of the audio. (A client still writing when
    # the call fails may see grpc's own INTERNAL "Internal error from Core" instead: a client-side race.)
    requests = RequestQueue()
    for message in [transcribe_config(), *audio_messages(audio)]:
        requests.send(message)

    failure = await call_fails(running.stub.Transcribe(requests, timeout=10))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.details()


async def test_a_file_that_plays_longer_than_the_limit_is_refused(start_llm):
    running = await start_llm(make_settings(speech_max_utterance_seconds=0.5))
    wav = wav_file(silence(1.0), 16000)
    requests = [transcribe_config(format=audio_format(llm_pb2.AUDIO_ENCODING_WAV)), *audio_messages(wav)]

    failure = await call_fails(running.stub.Transcribe(stream_of(requests), timeout=10))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plays longer than the limit of 0.5 seconds" in failure.details()


@pytest.mark.parametrize(
    ("messages", "detail"),
    [
        pytest.param([], "the call ended before its config", id="no messages"),
        pytest.param([TEXT], "the first SynthesizeRequest must carry config", id="text first"),
        pytest.param([synthesize_config(), synthesize_config()], "config comes once", id="config twice"),
        pytest.param([synthesize_config(), llm_pb2.SynthesizeRequest()], "must carry config or text", id="empty"),
        pytest.param([synthesize_config(voice="alloy")], "'local-piper' has no voice 'alloy'; it has joe", id="voice"),
        pytest.param(
            [synthesize_config(format=audio_format(llm_pb2.AUDIO_ENCODING_WEBM_OPUS))], "not WebM Opus", id="webm"
        ),
        pytest.param(
            [synthesize_config(format=audio_format(encoding=42))], "format.encoding 42", id="unknown encoding"
        ),
        pytest.param([synthesize_config(format=audio_format(sample_rate_hz=4000))], "4000 Hz", id="rate too low"),
        pytest.param(
            [synthesize_config(format=audio_format(llm_pb2.AUDIO_ENCODING_OGG_OPUS, 22050))],
            "Ogg Opus takes a sample rate of 8000, 12000, 16000, 24000, 48000 Hz, not 22050",
            id="an opus rate",
        ),
        pytest.param(
            [synthesize_config(model="local-whisper")], "'local-whisper' does not support speech synthesis", id="stt"
        ),
        pytest.param(
            [synthesize_config(), llm_pb2.SynthesizeRequest(text="x" * 100_001)],
            "longer than the limit of 100000 characters",
            id="too much text",
        ),
    ],
)
async def test_synthesize_refuses(llm, messages: list, detail: str):
    failure = await call_fails(llm.stub.Synthesize(stream_of(messages), timeout=10))

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.details()


async def test_generate_refuses_the_offline_speech_models(llm):
    for model in ("local-whisper", "local-piper"):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await collect(llm.stub, request(user("Hi"), model=model))

        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.details() == f"model '{model}' does not support text generation"
