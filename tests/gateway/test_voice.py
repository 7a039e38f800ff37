"""Voice through the whole system with the real offline engines: a question spoken into the Chat stream is
heard by faster-whisper, stored as the user message and answered in speech by Piper; barge-in keeps what
was heard; a dropped connection resumes audio like text; bad audio is a clear error."""

import asyncio
import itertools
import sys
import wave
from asyncio.subprocess import PIPE
from pathlib import Path

import grpc
import pytest
from chat_helpers import ChatStream, collect, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2
from tests.speech_samples import INPUT_RATE_HZ, as_wav, chunks, rms, spoken_pcm16

pytestmark = pytest.mark.timeout(180)

QUESTION = "What is the capital of France?"
SPEAK = chat_pb2.VoiceOptions(speak_answers=True)
# Most tests do not wait for the answer's speech to play out in real time.
UNPACED = {"voice_audio_lead_ms": 600_000}
SHORT_ANSWERS = {"local_min_reply_tokens": 8}
CHUNK_BYTES = 3200  # 100 ms of PCM16 at 16 kHz


def of_kind(events, kind: str) -> list:
    return [getattr(event, kind) for event in events if event.WhichOneof("kind") == kind]


def code_of(event: chat_pb2.ChatEvent) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == event.error.code)


async def speak(stream: ChatStream, pcm: bytes, client_message_id: str = "", commit: bool = True) -> None:
    for piece in chunks(pcm, CHUNK_BYTES):
        await stream.send(audio=chat_pb2.AudioInput(data=piece, client_message_id=client_message_id))
    if commit:
        await stream.send(commit=chat_pb2.CommitAudio())


async def stored_messages(system, conversation_id: str) -> list[history_pb2.Message]:
    response = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=conversation_id, page_size=100)
    )
    return list(response.messages)


def pcm_seconds(audio: list[chat_pb2.AudioOutput]) -> float:
    return sum(len(chunk.data) for chunk in audio) / 2 / audio[0].format.sample_rate_hz


async def test_a_spoken_question_is_heard_stored_and_answered_in_speech(make_system):
    system = await make_system(llm_overrides=SHORT_ANSWERS, **UNPACED)
    stream = ChatStream(system.chat)
    opened = await stream.open(voice=SPEAK)
    assert opened.session_opened.voice.speak_answers
    question = spoken_pcm16(QUESTION)
    await speak(stream, question, client_message_id="utterance-1")
    events = await stream.until_turn_ends(timeout=90)

    assert kinds(events)[-1] == "turn_completed", events[-1]
    assert len({event.turn_id for event in events}) == 1
    seqs = [event.seq for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0
    final = [t for t in of_kind(events, "transcript") if t.final]
    assert len(final) == 1 and final[0].client_message_id == "utterance-1"
    heard = final[0].text.lower()
    assert "capital" in heard and "france" in heard, heard
    stored = await stored_messages(system, opened.session_opened.conversation_id)
    assert stored[0].role == history_pb2.ROLE_USER and stored[0].content == final[0].text.strip()
    assert stored[0].client_message_id == "utterance-1"

    audio = of_kind(events, "audio")
    answer = text_of(events)
    assert audio and answer
    assert audio[0].format.encoding == chat_pb2.AUDIO_ENCODING_PCM16
    pcm = b"".join(chunk.data for chunk in audio)
    assert rms(pcm) > 300, "the answer audio is silent"
    seconds = pcm_seconds(audio)
    assert abs(sum(chunk.duration_ms for chunk in audio) / 1000 - seconds) < 0.05 * len(audio)
    words = len(answer.split())
    assert 0.15 * words < seconds < 1.0 * words, (seconds, words, answer)
    # The chunks cover the answer in order, each starting where the previous one played out.
    assert [chunk.offset_ms for chunk in audio] == [sum(c.duration_ms for c in audio[:i]) for i in range(len(audio))]
    assert all(a.text_end <= b.text_end for a, b in itertools.pairwise(audio))
    assert audio[-1].text_end == len(answer)
    usage = of_kind(events, "turn_completed")[0].usage
    assert abs(usage.audio_input_ms - len(question) / 2 / INPUT_RATE_HZ * 1000) < 300
    assert usage.audio_output_ms == sum(chunk.duration_ms for chunk in audio)


async def test_server_vad_finds_the_utterance_and_answers_without_a_commit(make_system):
    system = await make_system(llm_overrides=SHORT_ANSWERS, **UNPACED)
    stream = ChatStream(system.chat)
    await stream.open(voice=chat_pb2.VoiceOptions(turn_detection=chat_pb2.TURN_DETECTION_SERVER_VAD))
    await speak(stream, spoken_pcm16(QUESTION, silence_ms=1000), commit=False)
    events = await stream.until_turn_ends(timeout=90)

    order = kinds(events)
    assert order[0] == "speech_started"
    assert order.index("speech_stopped") < order.index("message_accepted") < order.index("turn_started")
    assert order[-1] == "turn_completed"
    final = [t for t in of_kind(events, "transcript") if t.final]
    assert "capital" in final[0].text.lower()
    assert not of_kind(events, "audio")  # voice output is off


async def test_an_interrupt_keeps_only_what_was_heard_and_no_audio_follows(make_system):
    # Paced (a short lead), so the interrupt lands while the answer is still being spoken.
    system = await make_system(voice_audio_lead_ms=200)
    stream = ChatStream(system.chat)
    opened = await stream.open(voice=SPEAK)
    await stream.say("Tell me a story about a lighthouse keeper and the sea. It should be long.")
    events = []
    while len(of_kind(events, "audio")) < 4:
        events.append(await stream.next_event(timeout=30))
    audio = of_kind(events, "audio")
    played_ms = audio[0].duration_ms + audio[1].duration_ms
    await stream.send(interrupt=chat_pb2.Interrupt(turn_id=events[-1].turn_id, played_ms=played_ms))
    events += await stream.until_turn_ends(timeout=30)

    cancelled = of_kind(events, "turn_cancelled")[0]
    assert cancelled.interrupted and cancelled.played_ms == played_ms
    assert cancelled.heard_chars == audio[1].text_end
    await stream.send(ping=chat_pb2.Ping(nonce="after"))
    after = await stream.until("pong")
    assert not of_kind(after, "audio"), "audio followed the interrupt's acknowledgement"
    stored = await stored_messages(system, opened.session_opened.conversation_id)
    answer = stored[-1]
    assert answer.role == history_pb2.ROLE_ASSISTANT
    assert answer.status == history_pb2.MESSAGE_STATUS_INTERRUPTED
    assert answer.content == text_of(events)[: cancelled.heard_chars]
    assert 0 < len(answer.content) < len(text_of(events))


async def test_a_dropped_connection_resumes_every_audio_and_text_event_once(make_system):
    system = await make_system(voice_audio_lead_ms=300)
    stream = ChatStream(system.chat)
    opened = await stream.open(voice=SPEAK)
    await stream.say("Please say a few sentences about the moon and the stars.")
    seen = []
    while len(of_kind(seen, "audio")) < 2:
        seen.append(await stream.next_event(timeout=30))
    stream.cancel()  # the connection drops; the turn goes on

    session_id = opened.session_opened.session_id
    rest = await collect(system.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=session_id, after_seq=seen[-1].seq)
    ), timeout=60)
    assert kinds(rest)[-1] == "turn_completed"
    everything = await collect(system.chat.ResumeStream(chat_pb2.ResumeStreamRequest(session_id=session_id)))
    logged = [event for event in seen if event.seq]
    assert [event.seq for event in logged + rest] == [event.seq for event in everything]
    assert [event.SerializeToString() for event in logged + rest] == [e.SerializeToString() for e in everything]
    assert len(of_kind(everything, "audio")) > 2


async def test_send_audio_lets_a_unary_caller_talk_and_resume_stream_follows(make_system):
    """grpc-web cannot stream requests: SendAudio adds audio (and commits), ResumeStream follows the turn."""
    system = await make_system(llm_overrides=SHORT_ANSWERS, **UNPACED)
    stream = ChatStream(system.chat)
    opened = await stream.open()
    stream.cancel()
    session_id = opened.session_opened.session_id
    wav = as_wav(spoken_pcm16(QUESTION))
    await system.chat.UpdateSession(chat_pb2.UpdateSessionRequest(
        session_id=session_id, voice=chat_pb2.VoiceOptions(input_format=chat_pb2.AudioFormat(
            encoding=chat_pb2.AUDIO_ENCODING_WAV
        ))
    ))
    pieces = chunks(wav, 32_000)
    for piece in pieces[:-1]:
        response = await system.chat.SendAudio(chat_pb2.SendAudioRequest(
            session_id=session_id, data=piece, client_message_id="wav-1"
        ))
        assert response.client_message_id == "wav-1" and response.buffered_bytes > 0
    response = await system.chat.SendAudio(chat_pb2.SendAudioRequest(
        session_id=session_id, data=pieces[-1], commit=True
    ))
    assert response.client_message_id == "wav-1" and response.buffered_bytes == 0
    events = await collect(system.chat.ResumeStream(chat_pb2.ResumeStreamRequest(
        session_id=session_id, after_seq=opened.session_opened.last_seq
    )), timeout=90)
    final = [t for t in of_kind(events, "transcript") if t.final]
    assert "france" in final[0].text.lower() and final[0].client_message_id == "wav-1"
    assert kinds(events)[-1] == "turn_completed"


async def test_bad_audio_gets_clear_invalid_argument_errors_and_the_stream_goes_on(make_system):
    system = await make_system(voice_max_audio_chunk_bytes=65_536, **UNPACED)
    stream = ChatStream(system.chat)
    await stream.send(open=chat_pb2.OpenSession(voice=chat_pb2.VoiceOptions(
        turn_detection=chat_pb2.TURN_DETECTION_SERVER_VAD,
        input_format=chat_pb2.AudioFormat(encoding=chat_pb2.AUDIO_ENCODING_WEBM_OPUS),
    )))
    refused = await stream.next_event()
    assert code_of(refused) == grpc.StatusCode.INVALID_ARGUMENT and "PCM16" in refused.error.message
    await stream.open(voice=chat_pb2.VoiceOptions(input_format=chat_pb2.AudioFormat(
        encoding=chat_pb2.AUDIO_ENCODING_WAV
    )))

    await stream.send(commit=chat_pb2.CommitAudio())
    nothing = await stream.next_event()
    assert code_of(nothing) == grpc.StatusCode.FAILED_PRECONDITION and not nothing.turn_id

    await stream.send(audio=chat_pb2.AudioInput(data=b"\0" * 70_000))
    too_big = await stream.next_event()
    assert code_of(too_big) == grpc.StatusCode.INVALID_ARGUMENT and "larger than" in too_big.error.message

    await stream.send(audio=chat_pb2.AudioInput(data=b"this is not a WAV file at all"))
    await stream.send(commit=chat_pb2.CommitAudio())
    events = await stream.until_turn_ends(timeout=30)
    assert code_of(events[-1]) == grpc.StatusCode.INVALID_ARGUMENT and events[-1].turn_id

    await stream.send(ping=chat_pb2.Ping(nonce="still here"))
    assert (await stream.until("pong"))[-1].pong.nonce == "still here"


async def test_silence_is_no_message(make_system):
    system = await make_system(**UNPACED)
    stream = ChatStream(system.chat)
    opened = await stream.open()
    await speak(stream, bytes(INPUT_RATE_HZ * 2))  # a second of digital silence
    events = await stream.until_turn_ends(timeout=30)
    assert code_of(events[-1]) == grpc.StatusCode.INVALID_ARGUMENT
    assert "no speech" in events[-1].error.message
    assert await stored_messages(system, opened.session_opened.conversation_id) == []


async def test_the_audio_quota_refuses_voice_turns_but_not_text(make_system):
    system = await make_system(
        llm_overrides=SHORT_ANSWERS, session_overrides={"quota_audio_seconds_per_day": 1}, **UNPACED
    )
    stream = ChatStream(system.chat)
    await stream.open(voice=SPEAK)
    await stream.say("hello")
    first = await stream.until_turn_ends(timeout=60)
    assert kinds(first)[-1] == "turn_completed"
    assert of_kind(first, "quota")[0].audio_seconds_remaining == 1
    await asyncio.sleep(0.2)  # the turn's end (and its audio seconds) reach the session service
    await stream.say("hello again")
    refused = await stream.next_event()
    assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.error.retryable
    await stream.send(update_session=chat_pb2.SessionUpdate(voice=chat_pb2.VoiceOptions()))
    assert (await stream.until("session_updated"))[-1].session_updated.voice == chat_pb2.VoiceOptions()
    await stream.say("typed, and not spoken")
    assert kinds(await stream.until_turn_ends(timeout=60))[-1] == "turn_completed"


DUPLEX = str(Path(sys.executable).parent / "duplex")


async def test_duplex_voice_speaks_a_wav_and_saves_the_spoken_answer(make_system, tmp_path):
    system = await make_system(llm_overrides=SHORT_ANSWERS, **UNPACED)
    question, answer = tmp_path / "question.wav", tmp_path / "answer.wav"
    question.write_bytes(as_wav(spoken_pcm16(QUESTION)))
    process = await asyncio.create_subprocess_exec(
        DUPLEX, "voice", "--wav", str(question), "--out", str(answer),
        "--target", f"127.0.0.1:{system.gateway.port}", stdout=PIPE, stderr=PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, stderr.decode()
    printed = stdout.decode().lower()
    assert "you>" in printed and "capital" in printed and "assistant>" in printed
    with wave.open(str(answer), "rb") as spoken:
        seconds = spoken.getnframes() / spoken.getframerate()
        assert seconds > 1 and rms(spoken.readframes(spoken.getnframes())) > 300

    not_a_wav = tmp_path / "notes.txt"
    not_a_wav.write_text("hello")
    refused = await asyncio.create_subprocess_exec(DUPLEX, "voice", "--wav", str(not_a_wav), stdout=PIPE, stderr=PIPE)
    _, stderr = await refused.communicate()
    assert refused.returncode == 2 and stderr.decode().count("\n") == 1 and "cannot use" in stderr.decode()
