"""Voice over the WebSocket: microphone audio as raw binary frames (a 0x00 byte, then PCM16) or base64 in JSON
frames; the answer's audio comes back base64 in JSON frames, and the answer encoding stays JSON."""

import base64

import aiohttp
from web_helpers import GRPC_WEB, decode_grpc_web, grpc_web_body, kind, text_of, web_url

from duplex.chat.v1 import chat_pb2
from tests.speech_samples import as_wav, chunks, spoken_pcm16

QUESTION = "What is the capital of France?"
FAST = {"voice_audio_lead_ms": 600_000}
SHORT_ANSWERS = {"local_min_reply_tokens": 8}
SERVICE = "/duplex.chat.v1.ChatService"


def of_kind(events: list[dict], name: str) -> list[dict]:
    return [event[name] for event in events if kind(event) == name]


async def test_raw_audio_frames_are_heard_and_the_answer_is_spoken_in_json_frames(make_system, connect):
    system = await make_system(llm_overrides=SHORT_ANSWERS, **FAST)
    async with connect(system) as chat:
        opened = await chat.open(voice={"speakAnswers": True})
        assert opened["voice"] == {"speakAnswers": True}
        for piece in chunks(spoken_pcm16(QUESTION), 3200):
            await chat.ws.send_bytes(b"\x00" + piece)
        await chat.send({"commit": {"clientMessageId": "ws-utterance"}})
        events = await chat.until_turn_ends(timeout=90)

    assert kind(events[-1]) == "turnCompleted"
    assert set(chat.frame_types) == {aiohttp.WSMsgType.TEXT}, "raw audio frames must not switch replies to binary"
    final = [t for t in of_kind(events, "transcript") if t.get("final")]
    assert final[0]["clientMessageId"] == "ws-utterance" and "france" in final[0]["text"].lower()
    audio = of_kind(events, "audio")
    assert audio and audio[0]["format"]["encoding"] == "AUDIO_ENCODING_PCM16"
    pcm_bytes = sum(len(base64.b64decode(chunk["data"])) for chunk in audio)
    rate = audio[0]["format"]["sampleRateHz"]
    assert abs(pcm_bytes / 2 / rate * 1000 - sum(chunk["durationMs"] for chunk in audio)) < 5 * len(audio)
    assert audio[-1]["textEnd"] == len(text_of(events))


async def test_base64_audio_in_json_frames_works_too(make_system, connect):
    system = await make_system(llm_overrides=SHORT_ANSWERS, **FAST)
    async with connect(system) as chat:
        await chat.open()
        for piece in chunks(spoken_pcm16(QUESTION), 6400):
            await chat.send({"audio": {"data": base64.b64encode(piece).decode(), "clientMessageId": "json-1"}})
        await chat.send({"commit": {}})
        events = await chat.until_turn_ends(timeout=90)
    final = [t for t in of_kind(events, "transcript") if t.get("final")]
    assert final[0]["clientMessageId"] == "json-1" and "capital" in final[0]["text"].lower()
    assert kind(events[-1]) == "turnCompleted" and not of_kind(events, "audio")


async def test_an_empty_raw_audio_frame_is_harmless_and_bad_voice_options_are_refused(make_system, connect):
    system = await make_system(**FAST)
    async with connect(system) as chat:
        await chat.send({"open": {"voice": {"inputFormat": {"sampleRateHz": 1000}}}})
        refused = await chat.next_event()
        assert refused["error"]["code"] == 3 and "sample_rate_hz" in refused["error"]["message"]
        await chat.open()
        await chat.send({"commit": {}})
        nothing = await chat.next_event()
        assert nothing["error"]["code"] == 9  # FAILED_PRECONDITION: no audio to commit
        await chat.send({"ping": {"nonce": "n"}})
        assert kind(await chat.next_event()) == "pong"


async def test_a_browser_without_request_streaming_talks_over_grpc_web(make_system, http, connect):
    """grpc-web: UpdateSession sets the voice, SendAudio sends a whole WAV recording and commits it,
    ResumeStream follows the turn it starts."""
    system = await make_system(llm_overrides=SHORT_ANSWERS, **FAST)
    async with connect(system) as chat:
        session_id = (await chat.open())["sessionId"]
    voice = chat_pb2.VoiceOptions(input_format=chat_pb2.AudioFormat(encoding=chat_pb2.AUDIO_ENCODING_WAV))
    _, messages, trailers = await call(
        http, system, f"{SERVICE}/UpdateSession", chat_pb2.UpdateSessionRequest(session_id=session_id, voice=voice)
    )
    assert trailers["grpc-status"] == "0" and chat_pb2.UpdateSessionResponse.FromString(messages[0]).voice == voice
    send = chat_pb2.SendAudioRequest(
        session_id=session_id, data=as_wav(spoken_pcm16(QUESTION)), client_message_id="web-1", commit=True
    )
    _, messages, trailers = await call(http, system, f"{SERVICE}/SendAudio", send)
    assert trailers["grpc-status"] == "0"
    assert chat_pb2.SendAudioResponse.FromString(messages[0]).client_message_id == "web-1"
    resume = chat_pb2.ResumeStreamRequest(session_id=session_id)
    _, messages, trailers = await call(http, system, f"{SERVICE}/ResumeStream", resume)
    events = [chat_pb2.ResumeStreamResponse.FromString(message).event for message in messages]
    assert trailers["grpc-status"] == "0" and events[-1].WhichOneof("kind") == "turn_completed"
    final = [e.transcript for e in events if e.WhichOneof("kind") == "transcript" and e.transcript.final]
    assert "france" in final[0].text.lower() and final[0].client_message_id == "web-1"


async def call(http, system, path: str, message) -> tuple:
    body = grpc_web_body(message)
    headers = {"Content-Type": GRPC_WEB, "X-Grpc-Web": "1"}
    async with http.post(web_url(system, path), data=body, headers=headers) as response:
        raw = await response.read()
    messages, trailers = decode_grpc_web(raw, GRPC_WEB)
    return response, messages, trailers
