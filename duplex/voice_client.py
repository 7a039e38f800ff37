"""`duplex voice --wav in.wav --out answer.wav`: speak a recorded question to the assistant, save its spoken answer.

The WAV goes up the Chat stream as the utterance's audio (the server decodes it), then a commit; the
transcript and the answer's text are printed as they arrive, and the answer's audio is written to --out.
Exits 0 when the turn completes, 1 when it ends otherwise, 2 when the input file is unusable.
"""

import os
import sys
import uuid
import wave

import grpc

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.chat_client import DEFAULT_TARGET, error_line
from duplex.common.server import insecure_channel

CHUNK_BYTES = 32_000
WAV_INPUT = chat_pb2.AudioFormat(encoding=chat_pb2.AUDIO_ENCODING_WAV)


class VoiceTurn:
    def __init__(self, args, wav: bytes):
        self._args = args
        self._wav = wav
        self.pcm = bytearray()
        self.sample_rate = 0
        self.outcome = ""

    def _requests(self):
        a = self._args
        voice = chat_pb2.VoiceOptions(speak_answers=True, input_format=WAV_INPUT, voice=a.voice)
        yield chat_pb2.ChatRequest(open=chat_pb2.OpenSession(session_id=a.session, model=a.model, voice=voice))
        if a.session:  # an existing session keeps its options unless told otherwise
            yield chat_pb2.ChatRequest(update_session=chat_pb2.SessionUpdate(voice=voice))
        utterance = uuid.uuid4().hex
        for start in range(0, len(self._wav), CHUNK_BYTES):
            data = self._wav[start : start + CHUNK_BYTES]
            yield chat_pb2.ChatRequest(audio=chat_pb2.AudioInput(data=data, client_message_id=utterance))
        yield chat_pb2.ChatRequest(commit=chat_pb2.CommitAudio())

    async def run(self, channel: grpc.aio.Channel) -> None:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(self._requests())
        try:
            async for response in call:
                if self._show(response.event):
                    return
        finally:
            call.cancel()

    def _show(self, event: chat_pb2.ChatEvent) -> bool:
        """Print one event; True once the turn has ended."""
        kind = event.WhichOneof("kind")
        if kind == "transcript" and event.transcript.final:
            print(f"you> {event.transcript.text.strip()}", flush=True)
        elif kind == "turn_started":
            print("assistant> ", end="", flush=True)
        elif kind == "delta":
            print(event.delta.text, end="", flush=True)
        elif kind == "audio":
            self.sample_rate = event.audio.format.sample_rate_hz
            self.pcm += event.audio.data
        elif kind == "error":
            print(f"\n{error_line(event.error)}", file=sys.stderr, flush=True)
            self.outcome = "error"
            return bool(event.turn_id)
        elif kind in ("turn_completed", "turn_cancelled"):
            print(flush=True)
            self.outcome = kind
            return True
        return False

    def save(self, path: str) -> None:
        with wave.open(path, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self.sample_rate or 22050)
            out.writeframes(bytes(self.pcm))
        seconds = len(self.pcm) / 2 / (self.sample_rate or 22050)
        print(f"[{seconds:.1f} s of answer audio written to {path}]", file=sys.stderr, flush=True)


def read_wav(path: str) -> bytes:
    """The file's bytes, after checking it is a WAV the server can decode."""
    try:
        with open(path, "rb") as file:
            data = file.read()
        with wave.open(path, "rb") as recording:
            if recording.getsampwidth() != 2:
                raise ValueError("it must hold 16-bit PCM samples")
    except (OSError, EOFError, wave.Error, ValueError) as error:
        print(f"duplex voice: cannot use {path} as a WAV recording: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return data


async def run(args) -> int:
    wav = read_wav(args.wav)
    target = args.target or os.environ.get("DUPLEX_GATEWAY_TARGET", DEFAULT_TARGET)
    turn = VoiceTurn(args, wav)
    async with insecure_channel(target) as channel:
        try:
            await turn.run(channel)
        except grpc.aio.AioRpcError as error:
            print(f"duplex voice: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if turn.pcm:
        turn.save(args.out)
    return 0 if turn.outcome == "turn_completed" else 1
