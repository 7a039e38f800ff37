"""One Synthesize call, without protos: text pieces in; audio chunks, each with its span of text, out.

Two workers run per call. The reader cuts the text into sentences as it arrives (llm_service.sentences)
and queues each one as soon as it is complete, so the first is spoken while the rest is still being
written. The speaker speaks the queued sentences in order: it asks the model for a sentence's audio,
cuts it into chunks of about CHUNK_MS, converts them to the call's format and queues them for the
client; while those go out, it already works on the next sentence. Both queues are bounded: text the
speaker cannot keep up with slows the client down (gRPC flow control), and so does audio the client
does not read.

`started` goes out right before the first audio chunk, naming the model and voice that really speak
(after any retries and fallbacks) and the format of every chunk; every later sentence is spoken by the
same model and voice, resampled to that format if need be.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from duplex.common.errors import InvalidArgument
from llm_service.audio import (
    OPUS_SAMPLE_RATES,
    AudioEncoding,
    PcmResampler,
    ogg_opus_file,
    wav_file,
)
from llm_service.pipeline import END, run_workers
from llm_service.providers.base import ModelDescription, SpeechAudio, SpeechRequest
from llm_service.resilience import Deadline, ModelRouter
from llm_service.sentences import Sentence, SentenceSplitter, SpanEstimator

log = logging.getLogger(__name__)

CHUNK_MS = 200
# A sentence's first chunk is short, so its first audio leaves as soon as an upstream that streams starts
# to (waiting for 200 ms of a real-time stream would add 200 ms to the answer's first sound).
FIRST_CHUNK_MS = 40
SENTENCE_QUEUE = 4
OUTPUT_QUEUE = 16
# Text one call may ask to have spoken (about two hours of speech).
MAX_SYNTHESIS_CHARS = 100_000
# How long a voice takes per character, until the call's own sentences tell (English: ~15 a second).
SECONDS_PER_CHAR = 1 / 15
# Before a streamed sentence's end is known, a chunk's span never reaches this far into it.
MAX_ESTIMATED_FRACTION = 0.95
# The rate of a model that did not say and has not spoken yet.
FALLBACK_SAMPLE_RATE = 24000


@dataclass(frozen=True, slots=True)
class SynthesisSetup:
    model: ModelDescription
    voice: str
    encoding: AudioEncoding
    # The rate wanted; 0: the voice's own (for Ogg Opus the nearest rate Opus takes).
    sample_rate: int


@dataclass(frozen=True, slots=True)
class SynthesisStartedEvent:
    model: str
    voice: str
    encoding: AudioEncoding
    sample_rate: int


@dataclass(frozen=True, slots=True)
class AudioChunkEvent:
    data: bytes
    duration_ms: int
    text_start: int
    text_end: int


@dataclass(frozen=True, slots=True)
class SynthesisFinishedEvent:
    audio_ms: int
    characters: int


SynthesizeEvent = SynthesisStartedEvent | AudioChunkEvent | SynthesisFinishedEvent


def output_sample_rate(encoding: AudioEncoding, wanted: int, voice_rate: int) -> int:
    """The rate of the call's chunks: the one asked for, else the voice's own (Ogg Opus: the nearest
    rate Opus takes at or above it)."""
    if wanted:
        return wanted
    rate = voice_rate or FALLBACK_SAMPLE_RATE
    if encoding == AudioEncoding.OGG_OPUS:
        return next((opus_rate for opus_rate in OPUS_SAMPLE_RATES if opus_rate >= rate), OPUS_SAMPLE_RATES[-1])
    return rate


class SentenceChunker:
    """Cuts one sentence's audio, as it streams from the model, into chunks at the call's rate, each
    with its span of text."""

    def __init__(self, sentence: Sentence, span_start: int, sample_rate: int, expected_seconds: float):
        self._spans = SpanEstimator(sentence, span_start)
        self._rate = sample_rate
        self._chunk = sample_rate * CHUNK_MS // 1000
        self._first_chunk = sample_rate * FIRST_CHUNK_MS // 1000
        self._expected = expected_seconds * sample_rate
        self._resampler: PcmResampler | None = None
        self._buffer = np.zeros(0, dtype="<i2")
        self.emitted = 0

    def feed(self, piece: SpeechAudio) -> list[tuple[np.ndarray, int, int]]:
        """Full chunks, keeping back some audio for the sentence's last chunk unless piece.last."""
        samples = self._resample(piece)
        if piece.last:
            samples = np.concatenate([samples, self._flush()])
        self._buffer = np.concatenate([self._buffer, samples])
        return self._take(final=piece.last)

    def finish(self) -> list[tuple[np.ndarray, int, int]]:
        """The rest, now that the model's stream has ended (nothing, after a last piece)."""
        self._buffer = np.concatenate([self._buffer, self._flush()])
        return self._take(final=True)

    def _resample(self, piece: SpeechAudio) -> np.ndarray:
        flushed = np.zeros(0, dtype="<i2")
        if self._resampler is not None and self._resampler.rate_in != piece.sample_rate:
            flushed = self._resampler.flush()
            self._resampler = None
        if self._resampler is None:
            self._resampler = PcmResampler(piece.sample_rate, self._rate)
        return np.concatenate([flushed, self._resampler.feed(piece.pcm16)])

    def _target(self, final: bool) -> int:
        """A short first chunk while the sentence's audio is still streaming in; then CHUNK_MS."""
        return self._first_chunk if self.emitted == 0 and not final else self._chunk

    def _flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype="<i2")
        flushed = self._resampler.flush()
        self._resampler = None
        return flushed

    def _take(self, final: bool) -> list[tuple[np.ndarray, int, int]]:
        chunks = []
        total = self.emitted + len(self._buffer)
        # The sentence's length in samples: known at its end, estimated before (never below what came).
        expected = total if final else max(self._expected, total + self._chunk)
        while len(self._buffer) > self._target(final) or (final and len(self._buffer)):
            size = min(self._target(final), len(self._buffer))
            if final and len(self._buffer) - size < self._chunk // 4:
                size = len(self._buffer)  # no sliver of a last chunk: it joins this one
            chunk, self._buffer = self._buffer[:size], self._buffer[size:]
            self.emitted += size
            last = final and not len(self._buffer)
            fraction = self.emitted / expected if final else min(self.emitted / expected, MAX_ESTIMATED_FRACTION)
            start, end = self._spans.next(fraction, last)
            chunks.append((chunk, start, end))
        return chunks


class SynthesisSession:
    def __init__(self, router: ModelRouter, setup: SynthesisSetup, deadline: Deadline):
        self._router = router
        self._setup = setup
        self._deadline = deadline
        # Who speaks; the model and voice of the first sentence speak the whole call.
        self._model = setup.model
        self._voice = setup.voice
        self._sample_rate = 0
        self._sentences: asyncio.Queue = asyncio.Queue(SENTENCE_QUEUE)
        self._out: asyncio.Queue = asyncio.Queue(OUTPUT_QUEUE)
        self._spoken_any = False
        self._span_end = 0
        self._samples = 0
        self._characters = 0
        self._seconds_per_char = SECONDS_PER_CHAR
        self._sentences_timed = 0

    async def run(self, texts: AsyncIterator[str]) -> AsyncGenerator[SynthesizeEvent, None]:
        async for event in run_workers(self._out, [self._read(texts), self._speak()]):
            yield event

    async def _read(self, texts: AsyncIterator[str]) -> None:
        splitter = SentenceSplitter()
        async for text in texts:
            if splitter.received_chars + len(text) > MAX_SYNTHESIS_CHARS:
                raise InvalidArgument(f"the text is longer than the limit of {MAX_SYNTHESIS_CHARS} characters")
            for sentence in splitter.feed(text):
                await self._sentences.put(sentence)
        for sentence in splitter.finish():
            await self._sentences.put(sentence)
        await self._sentences.put(END)

    async def _speak(self) -> None:
        while (sentence := await self._sentences.get()) is not END:
            await self._speak_sentence(sentence)
        if not self._sample_rate:
            await self._start(self._model.speech_sample_rate)
        audio_ms = round(self._samples * 1000 / self._sample_rate)
        await self._out.put(SynthesisFinishedEvent(audio_ms=audio_ms, characters=self._characters))
        await self._out.put(END)

    async def _start(self, voice_rate: int) -> None:
        setup = self._setup
        self._sample_rate = output_sample_rate(setup.encoding, setup.sample_rate, voice_rate)
        started = SynthesisStartedEvent(self._model.name, self._voice, setup.encoding, self._sample_rate)
        await self._out.put(started)

    async def _speak_sentence(self, sentence: Sentence) -> None:
        request = SpeechRequest(model=self._model.name, voice=self._voice, text=sentence.text)
        opened = await self._router.open_speech(request, self._deadline, retry=not self._spoken_any)
        if opened.model.name != self._model.name:
            log.info("speaking with %s instead of %s from now on", opened.model.name, self._model.name)
        self._model, self._voice = opened.model, opened.voice
        if not self._sample_rate:
            await self._start(opened.head.sample_rate if opened.head is not None else opened.model.speech_sample_rate)
        chunker = SentenceChunker(
            sentence, self._span_end, self._sample_rate, len(sentence.text) * self._seconds_per_char
        )
        async with aclosing(self._router.follow(opened, self._deadline)) as pieces:
            async for piece in pieces:
                for chunk in chunker.feed(piece):
                    await self._emit(*chunk)
        for chunk in chunker.finish():
            await self._emit(*chunk)
        if chunker.emitted:
            self._characters += len(sentence.text)
            self._learn_pace(sentence, chunker.emitted)

    async def _emit(self, samples: np.ndarray, text_start: int, text_end: int) -> None:
        pcm16 = samples.tobytes()
        if self._setup.encoding == AudioEncoding.WAV:
            data = wav_file(pcm16, self._sample_rate)
        elif self._setup.encoding == AudioEncoding.OGG_OPUS:
            data = await asyncio.to_thread(ogg_opus_file, pcm16, self._sample_rate)
        else:
            data = pcm16
        self._spoken_any = True
        self._samples += len(samples)
        self._span_end = text_end
        duration = round(len(samples) * 1000 / self._sample_rate)
        await self._out.put(AudioChunkEvent(data, duration, text_start, text_end))

    def _learn_pace(self, sentence: Sentence, samples: int) -> None:
        """How long this voice takes per character, averaged over the call's sentences so far."""
        if not samples:
            return
        seconds_per_char = samples / self._sample_rate / len(sentence.text)
        self._sentences_timed += 1
        self._seconds_per_char += (seconds_per_char - self._seconds_per_char) / self._sentences_timed
