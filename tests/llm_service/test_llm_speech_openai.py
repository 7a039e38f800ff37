"""Speech through the openai provider: the real server and `openai` SDK against the fake HTTP upstream's
/v1/audio/transcriptions and /v1/audio/speech."""

import io
import time
import wave

import grpc
import pytest
from llm_helpers import TEST_KEY, collect, fake_model, make_settings, request, user
from pydantic import ValidationError
from speech_helpers import (
    COMMIT,
    RequestQueue,
    audio_messages,
    kinds,
    silence,
    stream_of,
    synthesize,
    synthesize_config,
    transcribe,
    transcribe_config,
    transcripts,
)

from duplex.llm.v1 import llm_pb2
from llm_service.catalogue import ModelEntry
from llm_service.server import create_server
from tests.fake_openai import SPEECH_SAMPLE_RATE, FakeOpenAI, FakeReply, fake_speech

# Seconds within which a cancel must reach the upstream.
PROMPT = 0.5
HELLO = "Hello from the fake model."


def whisper(fake: FakeOpenAI, name: str = "whisper", **fields: object) -> ModelEntry:
    return fake_model(fake, name, supports_transcription=True, supports_embeddings=False, **fields)


def tts(fake: FakeOpenAI, name: str = "tts", **fields: object) -> ModelEntry:
    values: dict[str, object] = {"supports_speech": True, "voices": ["alloy", "echo"], "supports_embeddings": False}
    values.update(fields)
    return fake_model(fake, name, **values)


def speech_settings(*models: ModelEntry, **overrides: object):
    """Test settings with `models` in the catalogue (the demo stays the text default)."""
    return make_settings(llm_models=list(models), **overrides)


def read_wav(data: bytes) -> tuple[int, int, bytes]:
    with wave.open(io.BytesIO(data), "rb") as reader:
        return reader.getframerate(), reader.getnchannels(), reader.readframes(reader.getnframes())


async def test_an_utterance_goes_up_as_a_wav_file(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai)))
    audio = silence(0.5)

    responses = await transcribe(
        running.stub, [transcribe_config(model="whisper", language="en"), *audio_messages(audio), COMMIT]
    )

    assert kinds(responses) == ["started", "transcript"]
    [final] = transcripts(responses)
    assert (final.text, final.final, final.audio_ms, final.utterance) == (HELLO, True, 500, 0)
    [sent] = fake_openai.requests
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.headers["Authorization"] == f"Bearer {TEST_KEY}"
    body = sent.body
    assert (body["model"], body["language"], body["response_format"]) == ("upstream-whisper", "en", "json")
    assert "stream" not in sent.body
    assert (sent.body["file"]["filename"], sent.body["file"]["content_type"]) == ("utterance.wav", "audio/wav")
    assert read_wav(sent.body["file"]["data"]) == (16000, 1, audio)


async def test_a_streaming_model_gives_interim_transcripts(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai, transcription_stream=True)))
    fake_openai.script(FakeReply(chunks=["Hel", "lo ", "there."]))

    responses = await transcribe(
        running.stub, [transcribe_config(model="whisper", interim_results=True), *audio_messages(silence(0.3))]
    )

    assert [(t.text, t.final) for t in transcripts(responses)] == [
        ("Hel", False),
        ("Hello ", False),
        ("Hello there.", False),
        ("Hello there.", True),
    ]
    assert fake_openai.requests[0].body["stream"] == "true"


async def test_without_interim_results_a_streaming_model_is_not_streamed(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai, transcription_stream=True)))

    responses = await transcribe(running.stub, [transcribe_config(model="whisper"), *audio_messages(silence(0.3))])

    assert [(t.text, t.final) for t in transcripts(responses)] == [(HELLO, True)]
    assert "stream" not in fake_openai.requests[0].body


async def test_speech_streams_from_the_upstream_in_chunks_of_200_ms_after_a_short_first_one(
    start_llm, fake_openai: FakeOpenAI
):
    running = await start_llm(speech_settings(tts(fake_openai)))
    first, second = "Hello there.", "This is the fake voice speaking."
    # Pieces that split samples, as HTTP chunks may.
    fake_openai.script(FakeReply(audio_piece_bytes=4801), FakeReply(audio_piece_bytes=3333))

    speech = await synthesize(running.stub, [first + " " + second], model="tts")

    started = speech.started
    assert (started.model, started.voice, started.format.sample_rate_hz) == ("tts", "alloy", SPEECH_SAMPLE_RATE)
    assert speech.pcm == fake_speech(first) + fake_speech(second)
    durations = [chunk.duration_ms for chunk in speech.chunks]
    # Each sentence: a 40 ms first chunk (its first sound leaves at once), then 200 ms chunks but the last
    # (which takes in a sliver rather than leave it alone).
    assert durations.count(40) == 2 and durations[0] == 40
    assert durations.count(200) == len(durations) - 4 and max(durations) < 250
    assert speech.spans[0][0] == 0 and speech.spans[-1][1] == len(first) + 1 + len(second)
    assert len(first) in [end for _, end in speech.spans]
    assert speech.finished.audio_ms == round(len(speech.pcm) / 2 / SPEECH_SAMPLE_RATE * 1000)
    sent = [request.body for request in fake_openai.requests]
    assert [(body["model"], body["voice"], body["input"], body["response_format"]) for body in sent] == [
        ("upstream-tts", "alloy", first, "pcm"),
        ("upstream-tts", "alloy", second, "pcm"),
    ]


async def test_a_compatible_server_may_speak_at_another_rate(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai, speech_sample_rate=16000)))

    speech = await synthesize(running.stub, ["Hi."], model="tts", voice="echo", format={"sample_rate_hz": 8000})

    assert (speech.started.voice, speech.started.format.sample_rate_hz) == ("echo", 8000)
    # The fake sends 24 kHz samples, which the catalogue says are 16 kHz: they play 1.5 times as long.
    expected_ms = len(fake_speech("Hi.")) / 2 / 16000 * 1000
    assert abs(speech.finished.audio_ms - expected_ms) <= 2
    assert abs(len(speech.pcm) / 2 - expected_ms * 8) <= 16


async def test_cancelling_synthesize_closes_the_upstream_response(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply(audio=fake_speech("x" * 200), pace=0.05))
    call = running.stub.Synthesize(stream_of([synthesize_config(model="tts"), llm_pb2.SynthesizeRequest(text="Hi.")]))
    assert (await call.read()).HasField("started")
    assert (await call.read()).HasField("audio")

    cancelled_at = time.monotonic()
    call.cancel()

    [disconnected_at] = await fake_openai.wait_for_disconnects(1, timeout=2)
    assert disconnected_at - cancelled_at < PROMPT


async def test_cancelling_transcribe_closes_the_upstream_stream(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai, transcription_stream=True)))
    fake_openai.script(FakeReply(chunks=["Hel", "lo"], stall_after=1))
    requests = RequestQueue()
    for message in [transcribe_config(model="whisper", interim_results=True), *audio_messages(silence(0.3)), COMMIT]:
        requests.send(message)
    call = running.stub.Transcribe(requests)
    assert (await call.read()).HasField("started")
    assert (await call.read()).transcript.text == "Hel"

    cancelled_at = time.monotonic()
    call.cancel()

    [disconnected_at] = await fake_openai.wait_for_disconnects(1, timeout=2)
    assert disconnected_at - cancelled_at < PROMPT


async def test_speech_is_retried_before_its_first_audio(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply.error(503), FakeReply(drop_after=0), FakeReply())

    speech = await synthesize(running.stub, ["Hi."], model="tts")

    assert speech.pcm == fake_speech("Hi.")
    assert len(fake_openai.requests) == 3


async def test_a_transcription_is_retried_before_the_first_transcript(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai)))
    fake_openai.script(FakeReply.error(429, headers={"Retry-After": "0"}), FakeReply(chunks=["Fine."]))

    responses = await transcribe(running.stub, [transcribe_config(model="whisper"), *audio_messages(silence(0.2))])

    assert [t.text for t in transcripts(responses)] == ["Fine."]
    assert len(fake_openai.requests) == 2


async def test_speech_falls_back_to_the_offline_voice(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai, fallbacks=["local-piper"])))
    fake_openai.script(*[FakeReply.error(503)] * 3)

    speech = await synthesize(running.stub, ["Hello there."], model="tts", voice="echo")

    assert (speech.started.model, speech.started.voice, speech.started.format.sample_rate_hz) == (
        "local-piper",
        "joe",
        22050,
    )
    assert speech.finished.audio_ms > 500
    assert len(fake_openai.requests) == 3


async def test_speech_breaking_off_mid_sentence_is_unavailable(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply(audio=fake_speech("x" * 50), drop_after=5))

    call = running.stub.Synthesize(stream_of([synthesize_config(model="tts"), llm_pb2.SynthesizeRequest(text="Hi.")]))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in call:
            received.append(response.WhichOneof("kind"))

    assert received[:2] == ["started", "audio"]
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failure.value.details() == "model 'tts' is unavailable: the connection to its provider failed"
    assert len(fake_openai.requests) == 1


async def test_after_the_first_audio_a_failed_sentence_is_not_retried(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply(), FakeReply.error(503))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await synthesize(running.stub, ["First one. Second one."], model="tts")

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "answered 503" in failure.value.details()
    assert len(fake_openai.requests) == 2


async def test_after_the_first_transcript_a_failed_utterance_is_not_retried(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai)))
    fake_openai.script(FakeReply(chunks=["One."]), FakeReply.error(500))
    audio = audio_messages(silence(0.2))

    requests = [transcribe_config(model="whisper"), *audio, COMMIT, *audio, COMMIT]
    call = running.stub.Transcribe(stream_of(requests), timeout=10)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for response in call:
            received.append(response)

    assert [t.text for t in transcripts(received)] == ["One."]
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_openai.requests) == 2


@pytest.mark.parametrize("path", ["speech", "transcription"])
async def test_a_rejected_key_never_reaches_the_client(start_llm, fake_openai: FakeOpenAI, path: str):
    settings = speech_settings(whisper(fake_openai), tts(fake_openai), llm_retry_max_attempts=1)
    running = await start_llm(settings)
    fake_openai.script(FakeReply.error(401, f"Incorrect API key provided: {TEST_KEY}"))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        if path == "speech":
            await synthesize(running.stub, ["Hi."], model="tts")
        else:
            await transcribe(running.stub, [transcribe_config(model="whisper"), *audio_messages(silence(0.1))])

    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = failure.value.details()
    assert "rejected the configured credentials (401)" in details
    assert TEST_KEY[8:] not in details and str(fake_openai.port) not in details and "127.0.0.1" not in details


async def test_an_upstream_refusal_of_a_sentence_is_an_invalid_argument(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply.error(400, "Input is too long"))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await synthesize(running.stub, ["Hi."], model="tts")

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "model 'tts' rejected the request (400): Input is too long"


async def test_a_speech_model_is_refused_by_generate(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai), whisper(fake_openai)))

    for model in ("tts", "whisper", "local-piper"):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await collect(running.stub, request(user("Hi"), model=model))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.value.details() == f"model '{model}' does not support text generation"
    assert fake_openai.requests == []


async def test_list_models_shows_speech_entries_and_the_defaults_they_are_made(start_llm, fake_openai: FakeOpenAI):
    settings = speech_settings(
        whisper(fake_openai), tts(fake_openai), default_transcription_model="whisper", default_speech_model="tts"
    )
    running = await start_llm(settings)

    listing = await running.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)

    assert (listing.default_transcription_model, listing.default_speech_model) == ("whisper", "tts")
    models = {model.name: model for model in listing.models}
    assert (models["whisper"].supports_transcription, models["whisper"].supports_generation) == (True, False)
    assert (models["tts"].supports_speech, list(models["tts"].voices)) == (True, ["alloy", "echo"])
    responses = await transcribe(running.stub, [transcribe_config(), *audio_messages(silence(0.1))])
    assert responses[0].started.model == "whisper"


async def test_an_openai_key_alone_keeps_speech_offline(start_llm, fake_openai: FakeOpenAI):
    settings = make_settings(default_model="", openai_api_key=TEST_KEY, openai_base_url=fake_openai.base_url)
    running = await start_llm(settings)

    listing = await running.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)

    assert listing.default_model == "gpt-4o-mini"
    assert (listing.default_transcription_model, listing.default_speech_model) == ("local-whisper", "local-piper")


def test_a_speech_entry_needs_voices_and_built_in_names_are_taken():
    with pytest.raises(ValidationError, match="needs its voices"):
        ModelEntry.model_validate({"name": "tts", "supports_speech": True})
    with pytest.raises(ValidationError, match="built in"):
        ModelEntry.model_validate({"name": "local-whisper", "supports_transcription": True})
    entry = ModelEntry.model_validate({"name": "both", "supports_speech": True, "voices": ["a"]})
    assert not entry.generates
    assert ModelEntry.model_validate({"name": "chat"}).generates


@pytest.mark.parametrize(
    ("entries", "defaults", "message"),
    [
        pytest.param(
            [{"name": "tts", "supports_speech": True, "voices": ["a"], "fallbacks": ["local-whisper"]}],
            {},
            "falls back to 'local-whisper', which does not support speech synthesis",
            id="a fallback that cannot speak",
        ),
        pytest.param(
            [{"name": "stt", "supports_transcription": True, "fallbacks": ["local-demo"]}],
            {},
            "falls back to 'local-demo', which does not support transcription",
            id="a fallback that cannot transcribe",
        ),
        pytest.param([], {"default_speech_model": "nope"}, "default speech synthesis model 'nope'", id="no such model"),
        pytest.param(
            [], {"default_transcription_model": "local-piper"}, "default transcription model", id="not a transcriber"
        ),
        pytest.param([], {"default_model": "local-piper"}, "cannot generate text", id="a speech model for text"),
    ],
)
async def test_speech_configuration_mistakes_fail_at_startup(entries: list, defaults: dict, message: str):
    settings = make_settings(llm_models=entries, **defaults)

    with pytest.raises(ValueError, match=message):
        await create_server(settings)


async def test_a_transcription_stream_that_ends_early_is_unavailable(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai, transcription_stream=True)))
    fake_openai.script(FakeReply(chunks=["Hel"], finish_reason=""))

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await transcribe(
            running.stub, [transcribe_config(model="whisper", interim_results=True), *audio_messages(silence(0.1))]
        )

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped before finishing its transcript" in failure.value.details()


async def test_the_deadline_reaches_a_stalled_speech_upstream(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(tts(fake_openai)))
    fake_openai.script(FakeReply(stall_before_headers=True))
    call = running.stub.Synthesize(
        stream_of([synthesize_config(model="tts"), llm_pb2.SynthesizeRequest(text="Hi.")]), timeout=0.5
    )

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:
            pass

    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await fake_openai.wait_for_disconnects(1, timeout=PROMPT)


async def test_the_utterance_limit_is_per_utterance_not_per_call(start_llm, fake_openai: FakeOpenAI):
    running = await start_llm(speech_settings(whisper(fake_openai), speech_max_utterance_seconds=1.0))
    utterance = [*audio_messages(silence(0.7)), COMMIT]
    # A lone byte (half a sample) after a commit starts no utterance of its own.
    odd_byte = llm_pb2.TranscribeRequest(audio=b"\x00")

    responses = await transcribe(
        running.stub, [transcribe_config(model="whisper"), *utterance, odd_byte, *utterance, *utterance]
    )

    assert [(t.utterance, t.audio_ms) for t in transcripts(responses)] == [(0, 700), (1, 700), (2, 700)]
