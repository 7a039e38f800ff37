"""The voice load generator, run in its own process: N concurrent voice sessions on the native gRPC Chat
stream. Each opens a session with {speak_answers: true}, "speaks" a pre-recorded utterance (PCM16 at
16 kHz, sent in 100 ms chunks at real time, as a microphone would), commits it, reads until the turn ends,
pauses, and speaks again until the run's time is over. Prints one JSON object with every turn's timings.

    python -m duplex.bench.voice_loadgen '{"target": "127.0.0.1:50051", "sessions": 20, "audio_path": ...}'

Every interval is taken on the client's monotonic clock from the moment the commit is handed to the
stream (the end of the user's speech): to the final transcript, to the first text delta, to the first
answer audio event, and to the turn's end. Per sentence of the answer: from the moment the client has the
sentence's whole text to the first audio that speaks it.
"""

import asyncio
import json
import re
import resource
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import grpc

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc

TERMINAL = {"turn_completed", "turn_cancelled", "error"}
INPUT_RATE_HZ = 16000
# A turn that has not ended this long after its commit is counted as an error.
TURN_TIMEOUT_SECONDS = 60
OVERRUN_SECONDS = 60
# A sentence ends at ., ! or ? followed by white space or the end of the answer.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@dataclass
class TurnTimings:
    session: int
    number: int
    audio_ms: int
    commit_at: float = 0.0  # time.monotonic() of the commit (CLOCK_MONOTONIC: the same in every process)
    transcript_ms: float | None = None  # commit -> final transcript
    accepted_ms: float | None = None  # commit -> the transcript stored as the user message
    first_delta_ms: float | None = None  # commit -> the answer's first text
    first_audio_ms: float | None = None  # commit -> the answer's first audio
    end_ms: float | None = None  # commit -> turn_completed
    outcome: str = ""
    error: str = ""
    audio_events: int = 0
    answer_audio_ms: int = 0
    answer_chars: int = 0
    sentence_ms: list[float] = field(default_factory=list)  # per sentence: text complete -> its first audio


class _Turn:
    """What the reader knows of the turn being answered."""

    def __init__(self, timings: TurnTimings, commit_at: float | None = None):
        self.timings = timings
        self.commit_at = commit_at
        self.done = asyncio.get_running_loop().create_future()
        self.text = ""
        self.text_seen_at: list[tuple[int, float]] = []  # (answer length, when the client had it)
        self.audio_starts: dict[int, float] = {}  # text_start of a span -> when its first audio came

    def since_commit(self, now: float) -> float | None:
        return None if self.commit_at is None else (now - self.commit_at) * 1000

    def on_event(self, event: chat_pb2.ChatEvent, now: float) -> None:
        kind = event.WhichOneof("kind")
        t = self.timings
        if kind == "transcript" and event.transcript.final and t.transcript_ms is None:
            t.transcript_ms = self.since_commit(now)
        elif kind == "message_accepted" and t.accepted_ms is None:
            t.accepted_ms = self.since_commit(now)
        elif kind == "delta":
            if t.first_delta_ms is None:
                t.first_delta_ms = self.since_commit(now)
            self.text += event.delta.text
            self.text_seen_at.append((len(self.text), now))
        elif kind == "audio":
            if t.first_audio_ms is None:
                t.first_audio_ms = self.since_commit(now)
            t.audio_events += 1
            t.answer_audio_ms += event.audio.duration_ms
            self.audio_starts.setdefault(event.audio.text_start, now)
        elif kind in TERMINAL:
            t.end_ms = self.since_commit(now)
            t.outcome = kind
            if kind == "error":
                t.error = f"{event.error.code}: {event.error.message}"[:300]
            t.answer_chars = len(self.text)
            t.sentence_ms = self._sentence_latencies()
            if not self.done.done():
                self.done.set_result(None)

    def _sentence_latencies(self) -> list[float]:
        """For each sentence of the answer: its first audio minus when the client had its whole text."""
        latencies = []
        start = 0
        spans = sorted(self.audio_starts.items())
        for match in SENTENCE_END.finditer(self.text):
            end = match.end()
            complete_at = next((seen for length, seen in self.text_seen_at if length >= end), None)
            heard_at = min((at for text_start, at in spans if start <= text_start < end), default=None)
            if complete_at is not None and heard_at is not None:
                latencies.append((heard_at - complete_at) * 1000)
            start = end
            while start < len(self.text) and self.text[start].isspace():
                start += 1
        return latencies


async def voice_session(config: dict, index: int, audio: bytes, turns: list[TurnTimings], stop_at: float,
                        offset: float) -> None:
    chunk_bytes = INPUT_RATE_HZ * 2 * config["chunk_ms"] // 1000
    chunks = [audio[i:i + chunk_bytes] for i in range(0, len(audio), chunk_bytes)]
    audio_ms = len(audio) * 1000 // (INPUT_RATE_HZ * 2)
    voice = chat_pb2.VoiceOptions(
        speak_answers=True, transcription_model=config.get("transcription_model", ""),
        speech_model=config.get("speech_model", ""), voice=config.get("voice", ""),
        input_format=chat_pb2.AudioFormat(encoding=chat_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=INPUT_RATE_HZ),
    )
    await asyncio.sleep(offset)
    async with grpc.aio.insecure_channel(config["target"]) as channel:
        requests: asyncio.Queue = asyncio.Queue()

        async def request_iterator():
            while (request := await requests.get()) is not None:
                yield request

        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(request_iterator())
        await requests.put(chat_pb2.ChatRequest(open=chat_pb2.OpenSession(model=config.get("model", ""), voice=voice)))
        opened = await call.read()
        if opened is grpc.aio.EOF or opened.event.WhichOneof("kind") != "session_opened":
            raise ConnectionError(f"no session: {opened}")
        current: _Turn | None = None

        async def read_events() -> None:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("the Chat stream ended")
                if current is not None:
                    current.on_event(response.event, time.monotonic())

        reader = asyncio.create_task(read_events())
        try:
            number = 0
            while time.monotonic() < stop_at and number < config.get("max_turns", sys.maxsize):
                timings = TurnTimings(session=index, number=number, audio_ms=audio_ms)
                current = _Turn(timings)
                utterance_id = f"bench-{uuid.uuid4().hex}"
                started = time.monotonic()
                for position, data in enumerate(chunks):  # a microphone: one chunk per chunk_ms
                    await asyncio.sleep(max(0.0, started + position * config["chunk_ms"] / 1000 - time.monotonic()))
                    await requests.put(chat_pb2.ChatRequest(audio=chat_pb2.AudioInput(
                        data=data, client_message_id=utterance_id)))
                await asyncio.sleep(max(0.0, started + len(chunks) * config["chunk_ms"] / 1000 - time.monotonic()))
                current.commit_at = timings.commit_at = time.monotonic()  # the end of the user's speech
                await requests.put(chat_pb2.ChatRequest(commit=chat_pb2.CommitAudio(client_message_id=utterance_id)))
                done, _ = await asyncio.wait({current.done, reader}, timeout=TURN_TIMEOUT_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # the stream broke: raise its error
                if current.done not in done:
                    timings.outcome, timings.error = "timeout", f"no end {TURN_TIMEOUT_SECONDS}s after the commit"
                turns.append(timings)
                number += 1
                if timings.outcome == "timeout":
                    return
                await asyncio.sleep(config["pause_seconds"])
        finally:
            reader.cancel()
            await requests.put(None)
            call.cancel()


async def run_voice_load(config: dict, audio: bytes) -> dict:
    turns: list[TurnTimings] = []
    failures: list[str] = []
    sessions = config["sessions"]
    ramp = config["ramp_seconds"]
    stop_at = time.monotonic() + ramp + config["duration_seconds"]

    async def guarded(index: int) -> None:
        try:
            await voice_session(config, index, audio, turns, stop_at, offset=ramp * index / sessions)
        except Exception as error:  # one broken session is a counted failure, not the end of the run
            failures.append(f"session {index}: {type(error).__name__}: {error}"[:300])
            print(failures[-1], file=sys.stderr)

    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range(sessions))),
                               ramp + config["duration_seconds"] + OVERRUN_SECONDS)
    except TimeoutError:
        failures.append("run stopped: sessions still unfinished after the overrun allowance")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"turns": [asdict(t) for t in turns], "failures": failures, "elapsed_seconds": time.monotonic() - started,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["audio_path"], "rb") as source:
        audio = source.read()
    print(json.dumps(asyncio.run(run_voice_load(config, audio))))


if __name__ == "__main__":
    main()
