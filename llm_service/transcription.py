"""One Transcribe call, without protos: audio and commits in; speech starts and stops, transcripts out.

Two workers run per call. The reader takes the client's audio as it comes: PCM16 is resampled to
16 kHz as it arrives and, under server VAD, scored by the call's own turn detector, which cuts it into
utterances (each with SPEECH_PREFIX_MS of the audio before the speech began, as the start of a word is
often quieter than the threshold); file encodings (WAV, WebM, Ogg) are kept as they came and decoded
when the utterance ends. The transcriber transcribes ended utterances one after another, in order, each
final transcript after its utterance's speech_stopped. Interim transcripts come from a streaming
model's deltas, or, for a model that cannot stream, from transcribing the utterance so far again once
per interim interval of new speech, and only when the transcriber and its engine are idle, so interim
work never builds a backlog or delays a final transcript by more than one pass.

Between the two a bounded queue of utterances: a client sending audio faster than it can be transcribed
is slowed down by gRPC flow control rather than piling up memory.
"""

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import numpy as np

from duplex.common.errors import DuplexError, InvalidArgument, Unavailable
from llm_service.audio import (
    AudioEncoding,
    PcmResampler,
    decode_file,
    duration_ms,
    raise_too_long,
)
from llm_service.pipeline import END, run_workers
from llm_service.providers.base import (
    PCM_SAMPLE_BYTES,
    TRANSCRIPTION_SAMPLE_RATE,
    InterimTranscripts,
    ModelDescription,
    TranscriptDelta,
    TranscriptDone,
    TranscriptionRequest,
)
from llm_service.resilience import Deadline, ModelRouter
from llm_service.vad import SpeechStart, SpeechStop, TurnDetector, VadEvent, VadPool

log = logging.getLogger(__name__)

SPEECH_PREFIX_MS = 300
# VAD runs on the event loop for pieces up to this long (~0.5 ms per 32 ms window), in a thread beyond.
VAD_INLINE_SAMPLES = TRANSCRIPTION_SAMPLE_RATE // 4
UTTERANCE_QUEUE = 2
OUTPUT_QUEUE = 32
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpeechLimits:
    """Bounds on what one call may send, and the knobs of turn detection and interim results."""

    max_utterance_seconds: float = 60.0
    max_utterance_bytes: int = 8 * MIB
    max_audio_message_bytes: int = 1 * MIB
    vad_silence_ms: int = 500
    interim_interval_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class TranscriptionSetup:
    model: ModelDescription
    encoding: AudioEncoding
    # The PCM16 input's rate (file encodings carry their own).
    sample_rate: int
    language: str
    server_vad: bool
    interim: bool


@dataclass(frozen=True, slots=True)
class AudioInput:
    data: bytes


@dataclass(frozen=True, slots=True)
class CommitInput:
    pass


TranscribeInput = AudioInput | CommitInput


@dataclass(frozen=True, slots=True)
class SpeechStartedEvent:
    audio_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStoppedEvent:
    audio_ms: int


@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    text: str
    final: bool
    audio_ms: int
    utterance: int


TranscribeEvent = SpeechStartedEvent | SpeechStoppedEvent | TranscriptEvent


@dataclass(frozen=True, slots=True)
class FinalJob:
    utterance: int
    # PCM16 at 16 kHz, or the utterance's file as sent (encoding says which).
    audio: bytes
    encoding: AudioEncoding


@dataclass(frozen=True, slots=True)
class InterimJob:
    utterance: int
    pcm16: bytes


def samples_ms(samples: int) -> int:
    return round(samples * 1000 / TRANSCRIPTION_SAMPLE_RATE)


class TranscriptionSession:
    def __init__(
        self,
        router: ModelRouter,
        setup: TranscriptionSetup,
        limits: SpeechLimits,
        vad_pool: VadPool,
        deadline: Deadline,
    ):
        self._router = router
        self._setup = setup
        self._limits = limits
        self._vad_pool = vad_pool
        self._deadline = deadline
        # The model that transcribes; a fallback that answered keeps the call from then on.
        self._model = setup.model.name
        self._out: asyncio.Queue = asyncio.Queue(OUTPUT_QUEUE)
        self._jobs: asyncio.Queue = asyncio.Queue(UTTERANCE_QUEUE)
        self._transcribed_any = False
        self._transcriber_idle = True
        # Utterances numbered as they end; the current one gets the next number.
        self._utterances = 0
        # The current utterance: raw bytes received (for the limit), and for PCM16 its 16 kHz audio.
        self._utterance_bytes = 0
        self._file = bytearray()
        # PCM16: the call's recent 16 kHz audio, from stream position _recent_start on.
        self._recent = bytearray()
        self._recent_start = 0
        self._utterance_start: int | None = None
        self._last_interim = 0
        self._resampler = PcmResampler(setup.sample_rate, TRANSCRIPTION_SAMPLE_RATE)
        self._detector: TurnDetector | None = None
        # Set while no thread is running the detector (a cancelled call must not hand its state on early).
        self._vad_idle = threading.Event()
        self._vad_idle.set()
        self._max_samples = int(limits.max_utterance_seconds * TRANSCRIPTION_SAMPLE_RATE)
        self._interim_samples = int(limits.interim_interval_seconds * TRANSCRIPTION_SAMPLE_RATE)
        self._prefix_samples = SPEECH_PREFIX_MS * TRANSCRIPTION_SAMPLE_RATE // 1000
        self._repeat_interims = setup.interim and setup.model.interim_transcripts == InterimTranscripts.REPEATED
        self._stream_interims = setup.interim and setup.model.interim_transcripts == InterimTranscripts.STREAMED

    @property
    def _position(self) -> int:
        """Samples of 16 kHz audio received so far."""
        return self._recent_start + len(self._recent) // PCM_SAMPLE_BYTES

    async def run(self, inputs: AsyncIterator[TranscribeInput]) -> AsyncGenerator[TranscribeEvent, None]:
        vad = await self._vad_pool.acquire() if self._setup.server_vad else None
        if vad is not None:
            self._detector = TurnDetector(vad, silence_ms=self._limits.vad_silence_ms)
        try:
            async for event in run_workers(self._out, [self._read(inputs), self._transcribe()]):
                yield event
        finally:
            # A VAD state still in use by a thread (the call was cancelled mid-piece) is left to it.
            if vad is not None and self._vad_idle.is_set():
                self._vad_pool.release(vad)

    # The reader.

    async def _read(self, inputs: AsyncIterator[TranscribeInput]) -> None:
        async for item in inputs:
            if isinstance(item, CommitInput):
                await self._commit()
            elif self._setup.encoding == AudioEncoding.PCM16:
                await self._pcm(item.data)
            else:
                self._count_bytes(len(item.data))
                self._file += item.data
        await self._end_of_input()
        await self._jobs.put(END)

    def _count_bytes(self, size: int) -> None:
        self._utterance_bytes += size
        if self._utterance_bytes > self._limits.max_utterance_bytes:
            raise InvalidArgument(
                f"the utterance holds more than the limit of {self._limits.max_utterance_bytes} bytes; commit sooner"
            )

    async def _pcm(self, data: bytes) -> None:
        if self._detector is None:
            # Under server VAD the duration limit bounds an utterance (it is cut there), and silence
            # between utterances is not kept.
            self._count_bytes(len(data))
        await self._samples(self._resampler.feed(data))

    async def _samples(self, samples: np.ndarray) -> None:
        start = self._position
        self._recent += samples.tobytes()
        if self._detector is None:
            if self._utterance_start is None and len(samples):
                self._utterance_start = start
            if self._utterance_start is not None and self._position - self._utterance_start > self._max_samples:
                raise_too_long(self._limits.max_utterance_seconds)
        else:
            for event in await self._detect(samples):
                if isinstance(event, SpeechStart):
                    self._utterance_start = max(self._recent_start, event.position - self._prefix_samples)
                    self._last_interim = 0
                    await self._out.put(SpeechStartedEvent(samples_ms(event.position)))
                elif isinstance(event, SpeechStop):
                    await self._end_utterance(SpeechStoppedEvent(samples_ms(event.position)), event.detected_at)
            if self._utterance_start is not None and self._position - self._utterance_start > self._max_samples:
                # Under server VAD nobody commits: an utterance that long (speech, or noise) is cut.
                self._detector.force_silence()
                await self._end_utterance(SpeechStoppedEvent(samples_ms(self._position)), self._position)
            if self._utterance_start is None:
                self._forget_before(self._position - self._prefix_samples)
        self._maybe_interim()

    async def _detect(self, samples: np.ndarray) -> list[VadEvent]:
        detector = self._detector
        assert detector is not None
        if len(samples) <= VAD_INLINE_SAMPLES:
            return detector.process(samples)

        def process() -> list[VadEvent]:
            try:
                return detector.process(samples)
            finally:
                self._vad_idle.set()

        self._vad_idle.clear()
        return await asyncio.to_thread(process)

    def _forget_before(self, position: int) -> None:
        drop = position - self._recent_start
        if drop > 0:
            del self._recent[: drop * PCM_SAMPLE_BYTES]
            self._recent_start = position

    def _utterance_audio(self, end: int) -> bytes:
        assert self._utterance_start is not None
        begin = (self._utterance_start - self._recent_start) * PCM_SAMPLE_BYTES
        return bytes(self._recent[begin : (end - self._recent_start) * PCM_SAMPLE_BYTES])

    async def _end_utterance(self, stopped: SpeechStoppedEvent | None, end: int) -> None:
        """End the current utterance at stream position `end` (PCM16) or with its file, and queue it."""
        if self._setup.encoding == AudioEncoding.PCM16:
            audio = self._utterance_audio(end) if self._utterance_start is not None else b""
            self._forget_before(end)
        else:
            audio, self._file = bytes(self._file), bytearray()
        self._utterance_start = None
        self._utterance_bytes = 0
        self._last_interim = 0
        job = FinalJob(self._utterances, audio, self._setup.encoding)
        self._utterances += 1
        if stopped is not None:
            await self._out.put(stopped)
        await self._jobs.put(job)

    async def _commit(self) -> None:
        if self._detector is None:
            await self._end_utterance(None, self._position)
        elif self._utterance_start is not None:
            self._detector.force_silence()
            await self._end_utterance(SpeechStoppedEvent(samples_ms(self._position)), self._position)
        # Under server VAD, a commit while nobody speaks has nothing to end.

    async def _end_of_input(self) -> None:
        if self._setup.encoding == AudioEncoding.PCM16:
            await self._samples(self._resampler.flush())
        if self._detector is None:
            if self._utterance_bytes or self._file:
                await self._end_utterance(None, self._position)
        elif self._utterance_start is not None:
            await self._end_utterance(SpeechStoppedEvent(samples_ms(self._position)), self._position)

    def _maybe_interim(self) -> None:
        if not self._repeat_interims or self._utterance_start is None or self._setup.encoding != AudioEncoding.PCM16:
            return
        heard = self._position - self._utterance_start
        if heard - self._last_interim < self._interim_samples:
            return
        if not self._transcriber_idle or not self._jobs.empty():
            return
        self._last_interim = heard
        self._jobs.put_nowait(InterimJob(self._utterances, self._utterance_audio(self._position)))

    # The transcriber.

    async def _transcribe(self) -> None:
        interim: asyncio.Task | None = None
        try:
            while (job := await self._jobs.get()) is not END:
                if isinstance(job, InterimJob):
                    self._transcriber_idle = False
                    interim = asyncio.create_task(self._interim_pass(job), name="interim-transcript")
                    continue
                # A final transcript never waits for an interim pass: that pass is dropped (its engine
                # thread finishes on its own, holding its slot; the final one takes another).
                await _cancelled(interim)
                interim = None
                self._transcriber_idle = False
                try:
                    await self._final(job)
                finally:
                    self._transcriber_idle = True
        finally:
            await _cancelled(interim)
        await self._out.put(END)

    async def _interim_pass(self, job: InterimJob) -> None:
        """Best effort: a failed interim pass is logged; the final transcript still comes (or fails) itself."""
        try:
            await self._interim(job)
        except DuplexError as error:
            log.warning("an interim transcript failed: %s", error.message)
        finally:
            self._transcriber_idle = True

    async def _interim(self, job: InterimJob) -> None:
        if job.utterance != self._utterances:
            return  # that utterance has ended meanwhile: its final transcript is on the way
        text = await self._router.interim_transcript(self._request(job.pcm16), self._deadline)
        if text and job.utterance == self._utterances:
            await self._out.put(TranscriptEvent(text, False, self._ms(job.pcm16), job.utterance))

    async def _final(self, job: FinalJob) -> None:
        pcm16 = job.audio
        if job.encoding != AudioEncoding.PCM16 and job.audio:
            pcm16 = await asyncio.to_thread(decode_file, job.audio, job.encoding, self._limits.max_utterance_seconds)
        audio_ms = self._ms(pcm16)
        if not pcm16:
            await self._put_transcript(TranscriptEvent("", True, 0, job.utterance))
            return
        request = self._request(pcm16, stream=self._stream_interims)
        opened = await self._router.open_transcription(request, self._deadline, retry=not self._transcribed_any)
        if opened.model.name != self._model:
            log.info("transcribing with %s instead of %s from now on", opened.model.name, self._model)
            self._model = opened.model.name
        text = ""
        async for item in self._router.follow(opened, self._deadline):
            if isinstance(item, TranscriptDelta) and self._stream_interims and item.text:
                text += item.text
                await self._put_transcript(TranscriptEvent(text, False, audio_ms, job.utterance))
            elif isinstance(item, TranscriptDone):
                await self._put_transcript(TranscriptEvent(item.text.strip(), True, audio_ms, job.utterance))
                return
        raise Unavailable(f"model '{self._model}' stopped before finishing its transcript")

    async def _put_transcript(self, event: TranscriptEvent) -> None:
        self._transcribed_any = True
        await self._out.put(event)

    def _request(self, pcm16: bytes, stream: bool = False) -> TranscriptionRequest:
        return TranscriptionRequest(
            model=self._model, pcm16=pcm16, language=self._setup.language, stream=stream
        )

    @staticmethod
    def _ms(pcm16: bytes) -> int:
        return duration_ms(len(pcm16), TRANSCRIPTION_SAMPLE_RATE)


async def _cancelled(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
