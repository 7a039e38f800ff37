"""Transcribe and Synthesize with the real offline engines (Whisper tiny.en, Piper's joe voice, Silero
VAD), through the real server and real channels. The engines load once for the whole test session."""

import asyncio
import io
import itertools
import time
import wave

import av
import grpc
import numpy as np
import pytest
from llm_helpers import make_settings
from speech_helpers import (
    COMMIT,
    FOX,
    PARK,
    RATE,
    VOICE_RATE,
    RequestQueue,
    audio_format,
    audio_messages,
    kinds,
    pcm_seconds,
    read_all,
    rms,
    silence,
    synthesize,
    synthesize_config,
    transcribe,
    transcribe_config,
    transcripts,
    words,
    words_apart,
)

from duplex.llm.v1 import llm_pb2
from llm_service.audio import resample_pcm
from llm_service.providers import LocalProvider, LocalSpeechProvider
from llm_service.providers.local_speech import piper_engine, synthesize_text, whisper_engine


@pytest.fixture(scope="session")
def spoken() -> dict[str, bytes]:
    """Test sentences spoken by Piper, as 16 kHz PCM16 (and the engines loaded for the session)."""
    settings = make_settings()
    whisper_engine(settings.speech_threads, settings.speech_max_concurrency)
    voice = piper_engine(settings.speech_threads)
    return {text: resample_pcm(synthesize_text(voice, text), VOICE_RATE, RATE) for text in (FOX, PARK)}


def check_spans_cover(spans: list[tuple[int, int]], text_length: int) -> None:
    """Spans run in order without a gap from the start of the text to its end."""
    assert spans[0][0] == 0
    assert spans[-1][1] == text_length
    for (_, end), (start, next_end) in itertools.pairwise(spans):
        assert start == end <= next_end


async def test_a_sentence_piper_speaks_is_what_whisper_hears(llm, spoken):
    speech = await synthesize(llm.stub, [FOX])

    assert speech.kinds[0] == "started" and speech.kinds[-1] == "finished"
    assert set(speech.kinds[1:-1]) == {"audio"}
    started = speech.started
    assert (started.model, started.voice) == ("local-piper", "joe")
    assert (started.format.encoding, started.format.sample_rate_hz) == (llm_pb2.AUDIO_ENCODING_PCM16, VOICE_RATE)
    pcm = speech.pcm
    assert 1.5 < pcm_seconds(pcm, VOICE_RATE) < 6.0  # about 15 characters a second
    assert rms(pcm) > 500  # speech, not silence
    durations = [chunk.duration_ms for chunk in speech.chunks]
    assert all(duration <= 260 for duration in durations)
    assert all(abs(duration - 200) <= 2 for duration in durations[:-1])
    assert all(abs(len(c.data) / 2 * 1000 / VOICE_RATE - c.duration_ms) <= 0.5 for c in speech.chunks)
    assert abs(speech.finished.audio_ms - pcm_seconds(pcm, VOICE_RATE) * 1000) <= 1
    assert speech.finished.characters == len(FOX)
    check_spans_cover(speech.spans, len(FOX))

    # Back through Whisper, at the voice's rate, in 100 ms messages.
    config = transcribe_config(format=audio_format(sample_rate_hz=VOICE_RATE))
    responses = await transcribe(llm.stub, [config, *audio_messages(pcm, VOICE_RATE // 5)])

    assert kinds(responses) == ["started", "transcript"]
    assert responses[0].started.model == "local-whisper"
    [final] = transcripts(responses)
    assert (final.final, final.utterance) == (True, 0)
    assert words(final.text) == words(FOX)
    assert abs(final.audio_ms - speech.finished.audio_ms) <= 5


async def test_speech_starts_with_the_first_sentence_while_the_text_goes_on(llm):
    requests = RequestQueue()
    call = llm.stub.Synthesize(requests, timeout=30)
    first, second = PARK, "Then the fox came, and it jumped over the dog."
    requests.send(synthesize_config())
    sent_at = time.monotonic()
    requests.send(llm_pb2.SynthesizeRequest(text=first[:10]))
    requests.send(llm_pb2.SynthesizeRequest(text=first[10:] + " Then"))

    received = [await call.read(), await call.read()]
    first_audio_after = time.monotonic() - sent_at

    assert [response.WhichOneof("kind") for response in received] == ["started", "audio"]
    assert first_audio_after < 2.0
    requests.send(llm_pb2.SynthesizeRequest(text=second[4:]))
    requests.close()
    received += await read_all(call)
    chunks = [response.audio for response in received if response.HasField("audio")]
    text = first + " " + second
    check_spans_cover([(chunk.text_start, chunk.text_end) for chunk in chunks], len(text))
    # The first sentence's last chunk ends exactly where the sentence does.
    assert len(first) in [chunk.text_end for chunk in chunks]
    assert received[-1].finished.characters == len(text) - 1
    seconds = sum(chunk.duration_ms for chunk in chunks) / 1000
    assert 3.0 < seconds < 10.0


async def test_server_vad_finds_each_utterance_and_transcribes_it(llm, spoken):
    park, fox = spoken[PARK], spoken[FOX]
    audio = silence(0.8) + park + silence(1.2) + fox + silence(1.0)
    config = transcribe_config(turn_detection=llm_pb2.TURN_DETECTION_SERVER_VAD)

    responses = await transcribe(llm.stub, [config, *audio_messages(audio)])

    events = [(response.WhichOneof("kind"), response) for response in responses[1:]]
    starts = [response.speech_started.audio_ms for kind, response in events if kind == "speech_started"]
    stops = [response.speech_stopped.audio_ms for kind, response in events if kind == "speech_stopped"]
    finals = transcripts(responses, final=True)
    assert len(starts) == len(stops) == len(finals) == 2
    park_ms, fox_ms = pcm_seconds(park, RATE) * 1000, pcm_seconds(fox, RATE) * 1000
    assert abs(starts[0] - 800) < 250
    assert abs(stops[0] - (800 + park_ms)) < 350
    assert abs(starts[1] - (2000 + park_ms)) < 250
    assert abs(stops[1] - (2000 + park_ms + fox_ms)) < 350
    assert [final.utterance for final in finals] == [0, 1]
    assert words(finals[0].text) == words(PARK)
    assert words(finals[1].text) == words(FOX)
    # Each final transcript follows its utterance's speech_stopped.
    order = [kind for kind, _ in events if kind != "transcript" or _.transcript.final]
    assert order.index("speech_stopped") < order.index("transcript")
    assert order[order.index("speech_stopped") :].count("transcript") == 2
    # An utterance is its speech with a little audio around it, not the silence between.
    assert park_ms < finals[0].audio_ms < park_ms + 1200


async def test_interim_transcripts_come_while_the_utterance_goes_on(llm, spoken):
    fox = spoken[FOX]
    requests = RequestQueue()
    call = llm.stub.Transcribe(requests, timeout=30)
    requests.send(transcribe_config(interim_results=True))
    for message in audio_messages(fox[: int(1.3 * RATE) * 2]):
        requests.send(message)

    received = [await call.read(), await call.read()]

    assert [response.WhichOneof("kind") for response in received] == ["started", "transcript"]
    interim = received[1].transcript
    assert (interim.final, interim.utterance) == (False, 0)
    assert 1000 <= interim.audio_ms <= 1300
    assert words(interim.text)[:2] == ["the", "quick"]
    for message in audio_messages(fox[int(1.3 * RATE) * 2 :]):
        requests.send(message)
    requests.close()
    received += await read_all(call)
    final = received[-1].transcript
    assert final.final and words(final.text) == words(FOX)
    assert all(not transcript.final for transcript in transcripts(received[:-1]))


def encode(pcm: bytes, container: str) -> bytes:
    """16 kHz PCM16 as a WAV file, or as Opus in a WebM or Ogg file (what browsers and apps send)."""
    buffer = io.BytesIO()
    if container == "wav":
        with wave.open(buffer, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(RATE)
            writer.writeframes(pcm)
        return buffer.getvalue()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream("libopus", rate=48000, layout="mono")
        samples = np.frombuffer(resample_pcm(pcm, RATE, 48000), dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("encoding", "container"),
    [
        pytest.param(llm_pb2.AUDIO_ENCODING_WAV, "wav", id="wav"),
        pytest.param(llm_pb2.AUDIO_ENCODING_WEBM_OPUS, "webm", id="webm opus"),
        pytest.param(llm_pb2.AUDIO_ENCODING_OGG_OPUS, "ogg", id="ogg opus"),
    ],
)
async def test_files_are_decoded_when_the_utterance_ends(llm, spoken, encoding: int, container: str):
    data = encode(spoken[PARK], container)
    config = transcribe_config(format=audio_format(encoding))

    responses = await transcribe(llm.stub, [config, *audio_messages(data, 4096), COMMIT])

    [final] = transcripts(responses)
    # Opus is lossy: Whisper may hear one word differently ("the" for "a") under load; WAV is exact.
    assert final.final and words_apart(final.text, PARK) <= (0 if container == "wav" else 1), final.text
    assert abs(final.audio_ms - pcm_seconds(spoken[PARK], RATE) * 1000) < 60


async def test_commits_without_audio_give_empty_final_transcripts(llm):
    responses = await transcribe(llm.stub, [transcribe_config(), COMMIT, COMMIT])

    assert [(t.text, t.final, t.audio_ms, t.utterance) for t in transcripts(responses)] == [
        ("", True, 0, 0),
        ("", True, 0, 1),
    ]


@pytest.mark.parametrize(
    ("output", "expected_rate"),
    [
        pytest.param(audio_format(sample_rate_hz=16000), 16000, id="pcm at 16 kHz"),
        pytest.param(audio_format(llm_pb2.AUDIO_ENCODING_WAV), VOICE_RATE, id="wav"),
        pytest.param(audio_format(llm_pb2.AUDIO_ENCODING_OGG_OPUS), 24000, id="ogg opus"),
    ],
)
async def test_audio_comes_in_the_format_asked_for(llm, output: llm_pb2.AudioFormat, expected_rate: int):
    speech = await synthesize(llm.stub, ["Hello there, my friend."], format=output)

    assert speech.started.format.encoding == (output.encoding or llm_pb2.AUDIO_ENCODING_PCM16)
    assert speech.started.format.sample_rate_hz == expected_rate
    for chunk in speech.chunks:
        samples = decode_chunk(chunk.data, output.encoding, expected_rate)
        assert abs(len(samples) / 2 * 1000 / expected_rate - chunk.duration_ms) <= 25
    assert rms(b"".join(decode_chunk(c.data, output.encoding, expected_rate) for c in speech.chunks)) > 300


def decode_chunk(data: bytes, encoding: int, rate: int) -> bytes:
    """Each chunk stands alone: PCM16, a complete WAV file, or a complete Ogg Opus file."""
    if encoding == llm_pb2.AUDIO_ENCODING_WAV:
        with wave.open(io.BytesIO(data), "rb") as reader:
            assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (rate, 1, 2)
            return reader.readframes(reader.getnframes())
    if encoding == llm_pb2.AUDIO_ENCODING_OGG_OPUS:
        with av.open(io.BytesIO(data), format="ogg") as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
            frames += resampler.resample(None)
            return b"".join(frame.to_ndarray().tobytes() for frame in frames)
    return data


@pytest.mark.parametrize("texts", [[], [""], ["   ", "... \n"]], ids=["none", "empty", "nothing to say"])
async def test_text_with_nothing_to_say_is_started_and_finished(llm, texts: list[str]):
    speech = await synthesize(llm.stub, texts)

    assert speech.kinds == ["started", "finished"]
    assert (speech.started.model, speech.started.format.sample_rate_hz) == ("local-piper", VOICE_RATE)
    assert (speech.finished.audio_ms, speech.finished.characters) == (0, 0)


async def test_cancelling_synthesize_stops_the_call_and_its_engine_work(start_llm):
    speech = LocalSpeechProvider(max_concurrency=1)
    running = await start_llm(providers=[LocalProvider(tokens_per_second=0, min_reply_tokens=1), speech])
    call = running.stub.Synthesize(
        iter([synthesize_config(), llm_pb2.SynthesizeRequest(text="This sentence is spoken. " * 30)]), timeout=30
    )
    assert (await call.read()).HasField("started")
    assert (await call.read()).HasField("audio")

    call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call.read()
    for _ in range(100):  # the sentence being synthesized finishes; nothing after it starts
        if speech.jobs_running == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert speech.jobs_running == 0


async def test_the_deadline_ends_a_transcription_that_waits_for_audio(llm):
    requests = RequestQueue()
    requests.send(transcribe_config())
    call = llm.stub.Transcribe(requests, timeout=0.5)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in call:
            pass

    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_list_models_describes_the_speech_engines(llm):
    listing = await llm.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=5)

    assert (listing.default_transcription_model, listing.default_speech_model) == ("local-whisper", "local-piper")
    models = {model.name: model for model in listing.models}
    whisper, piper, demo = models["local-whisper"], models["local-piper"], models["local-demo"]
    assert (whisper.supports_transcription, whisper.supports_speech) == (True, False)
    assert (piper.supports_transcription, piper.supports_speech) == (False, True)
    assert not whisper.supports_generation and not piper.supports_generation
    assert list(piper.voices) == ["joe"]
    assert demo.HasField("supports_generation") and demo.supports_generation
    assert "tiny.en" in whisper.description and "joe" in piper.description
