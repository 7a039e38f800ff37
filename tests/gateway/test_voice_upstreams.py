"""Voice against an OpenAI-compatible speech server (the tests' own fake, real HTTP): a cancel during the
answer's speech closes the speech upstream at once, and a speech upstream failing mid-answer ends the turn
with a retryable error while the answer's text is kept."""

import time

import grpc
import pytest
from chat_helpers import ChatStream, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2
from duplex.session.v1 import session_pb2
from tests.fake_openai import FakeOpenAI, FakeReply

pytestmark = pytest.mark.timeout(120)

KEY_VARIABLE = "DUPLEX_TEST_SPEECH_KEY"
PROMPT_SECONDS = 0.5


@pytest.fixture
async def speech_server(monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, "sk-speech-test")
    async with FakeOpenAI() as fake:
        yield fake


def speech_catalogue(fake: FakeOpenAI) -> dict:
    entry = {
        "name": "remote-tts", "base_url": fake.base_url, "api_key_env": KEY_VARIABLE, "supports_speech": True,
        "voices": ["alloy"],
    }
    return {"llm_models": [entry], "default_speech_model": "remote-tts", "llm_retry_max_attempts": 1}


async def spoken_answer(system) -> ChatStream:
    stream = ChatStream(system.chat)
    await stream.open(voice=chat_pb2.VoiceOptions(speak_answers=True))
    await stream.say("Tell me about the harbour. Say a few sentences about the boats in it.")
    return stream


async def test_a_cancel_while_the_answer_is_spoken_closes_the_speech_upstream_at_once(make_system, speech_server):
    speech_server.script(FakeReply(audio=bytes(480_000), audio_piece_bytes=4800, pace=0.05))  # 10 s, streamed
    system = await make_system(llm_overrides=speech_catalogue(speech_server), voice_audio_lead_ms=600_000)
    stream = await spoken_answer(system)
    events = await stream.until("audio", timeout=30)
    [request] = await speech_server.wait_for_requests(1)
    assert request.path == "/v1/audio/speech" and request.body["voice"] == "alloy"
    cancelled_at = time.monotonic()
    await stream.send(cancel=chat_pb2.Cancel())
    [disconnected_at] = await speech_server.wait_for_disconnects(1, timeout=5)
    assert disconnected_at - cancelled_at < PROMPT_SECONDS
    events += await stream.until_turn_ends(timeout=10)
    assert kinds(events)[-1] == "turn_cancelled"
    assert "audio" not in kinds(events[kinds(events).index("turn_cancelled"):])


async def test_a_speech_upstream_failing_mid_answer_ends_the_turn_retryably_and_keeps_the_text(
    make_system, speech_server
):
    speech_server.script(FakeReply(audio=bytes(96_000), audio_piece_bytes=4800, drop_after=3))
    system = await make_system(llm_overrides=speech_catalogue(speech_server), voice_audio_lead_ms=600_000)
    stream = await spoken_answer(system)
    events = await stream.until_turn_ends(timeout=30)
    error = events[-1].error
    assert kinds(events)[-1] == "error" and error.retryable
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "speaking the answer failed" in error.message
    assert "sk-speech-test" not in error.message and speech_server.base_url not in error.message
    session = await system.session_store.GetSession(
        session_pb2.GetSessionRequest(user_id="local", session_id=events[-1].session_id)
    )
    stored = await system.history_store.ListMessages(history_pb2.ListMessagesRequest(
        user_id="local", conversation_id=session.session.conversation_id, page_size=10
    ))
    answer = stored.messages[-1]
    assert answer.role == history_pb2.ROLE_ASSISTANT and answer.status == history_pb2.MESSAGE_STATUS_ERROR
    assert answer.content and answer.content == text_of(events)
