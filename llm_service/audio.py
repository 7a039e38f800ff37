"""Audio in and out of the speech calls: decoding, resampling and encoding, without protos.

Speech travels inside the service as PCM16 (signed 16-bit little-endian mono). Input arrives as PCM16 at
any rate from 8 to 48 kHz, as a WAV file (the standard library's `wave`), or as Opus in WebM or Ogg (PyAV,
which faster-whisper depends on anyway); transcription models get it at 16 kHz. Output leaves as PCM16
at the voice's rate or a requested one, as WAV files, or as Ogg Opus files.

Containers are decoded with their demuxer named (never probed), so bytes claiming to be WebM cannot make
FFmpeg open a playlist, a URL or another file. Every failure to decode is InvalidArgument.
"""

import io
import struct
import wave
from enum import StrEnum

import av
import numpy as np

from duplex.common.errors import InvalidArgument

# Speech samples: 16-bit signed little-endian mono PCM, always in whole samples.
PCM_SAMPLE_BYTES = 2
# The rate speech reaches transcription models at (Whisper's own).
TRANSCRIPTION_SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
# The rates an Opus encoder takes.
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_BIT_RATE = 32000
# The demuxer that reads each container encoding.
DEMUXERS = {"webm_opus": "matroska", "ogg_opus": "ogg"}
# Errors PyAV raises for bytes it cannot read (FFmpegError covers FFmpeg's own; ValueError a frame or
# resampler that does not fit; EOFError and OSError a truncated input).
DECODE_ERRORS = (av.error.FFmpegError, ValueError, EOFError, OSError)


class AudioEncoding(StrEnum):
    PCM16 = "pcm16"
    WAV = "wav"
    WEBM_OPUS = "webm_opus"
    OGG_OPUS = "ogg_opus"


CONTAINER_ENCODINGS = (AudioEncoding.WEBM_OPUS, AudioEncoding.OGG_OPUS)
ENCODING_NAMES = {
    AudioEncoding.PCM16: "PCM16",
    AudioEncoding.WAV: "WAV",
    AudioEncoding.WEBM_OPUS: "WebM Opus",
    AudioEncoding.OGG_OPUS: "Ogg Opus",
}


def check_sample_rate(rate: int, what: str) -> int:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidArgument(f"{what} is {rate} Hz; it must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE}")
    return rate


def duration_ms(pcm16_bytes: int, sample_rate: int) -> int:
    return round(pcm16_bytes / PCM_SAMPLE_BYTES * 1000 / sample_rate)


class PcmResampler:
    """Streams PCM16 bytes at one rate into int16 samples at another (libswresample, keeping its state
    between pieces); bytes may split a sample anywhere."""

    def __init__(self, rate_in: int, rate_out: int):
        self.rate_in = rate_in
        self.rate_out = rate_out
        self._odd = b""
        self._resampler = None if rate_in == rate_out else av.AudioResampler(format="s16", layout="mono", rate=rate_out)

    def feed(self, data: bytes) -> np.ndarray:
        data = self._odd + data
        whole = len(data) - len(data) % PCM_SAMPLE_BYTES
        self._odd = data[whole:]
        samples = np.frombuffer(data[:whole], dtype="<i2")
        if self._resampler is None or not len(samples):
            return samples.copy()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate_in
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """What the resampler still holds; the stream is over (the last odd byte is dropped)."""
        self._odd = b""
        if self._resampler is None:
            return np.zeros(0, dtype="<i2")
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype="<i2")
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames]).astype("<i2", copy=False)


def resample_pcm(pcm16: bytes, rate_in: int, rate_out: int) -> bytes:
    """A whole piece of PCM16 at another rate."""
    if rate_in == rate_out:
        return pcm16
    resampler = PcmResampler(rate_in, rate_out)
    return np.concatenate([resampler.feed(pcm16), resampler.flush()]).tobytes()


def decode_file(data: bytes, encoding: AudioEncoding, max_seconds: float) -> bytes:
    """A whole utterance file as PCM16 at 16 kHz; InvalidArgument when it cannot be read or plays longer
    than max_seconds (checked while decoding, so a small file cannot expand without bound)."""
    if encoding == AudioEncoding.WAV:
        return decode_wav(data, max_seconds)
    if encoding in CONTAINER_ENCODINGS:
        return decode_container(data, encoding, max_seconds)
    raise InvalidArgument(f"{ENCODING_NAMES[encoding]} audio is not a file")


def decode_wav(data: bytes, max_seconds: float) -> bytes:
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            check_sample_rate(rate, "the WAV file's sample rate")
            # Never more than the limit allows (a streamed WAV's header may claim 4 GiB).
            frames = reader.readframes(int((max_seconds + 1) * rate))
    except (wave.Error, EOFError, struct.error) as error:
        raise InvalidArgument(f"the audio is not a readable PCM WAV file ({error or type(error).__name__})") from None
    if channels < 1 or width not in (1, 2, 3, 4):
        raise InvalidArgument(f"the WAV file has {channels} channels of {width * 8}-bit samples; it cannot be read")
    samples = wav_samples(frames, width, channels)
    if len(samples) / rate > max_seconds:
        raise_too_long(max_seconds)
    return resample_pcm(samples.tobytes(), rate, TRANSCRIPTION_SAMPLE_RATE)


def wav_samples(frames: bytes, width: int, channels: int) -> np.ndarray:
    """WAV frames (8-bit unsigned, 16/24/32-bit signed, any channels) as int16 mono."""
    usable = len(frames) - len(frames) % (width * channels)
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:
        values = (raw.astype(np.int32) - 128) << 8
    elif width == 2:
        values = raw.view("<i2").astype(np.int32)
    elif width == 3:
        triples = raw.reshape(-1, 3).astype(np.int32)
        values = (triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)) << 8 >> 16
    else:
        values = raw.view("<i4") >> 16
    mono = values.reshape(-1, channels).mean(axis=1)
    return np.clip(mono, -32768, 32767).astype("<i2")


def decode_container(data: bytes, encoding: AudioEncoding, max_seconds: float) -> bytes:
    name = ENCODING_NAMES[encoding]
    max_samples = int(max_seconds * TRANSCRIPTION_SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=DEMUXERS[encoding.value]) as container:
            if not container.streams.audio:
                raise InvalidArgument(f"the {name} audio holds no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=TRANSCRIPTION_SAMPLE_RATE)
            for frame in container.decode(stream):
                frame.pts = None  # timestamps do not matter here, and odd ones upset the resampler
                for piece in resampler.resample(frame):
                    pieces.append(piece.to_ndarray().reshape(-1))
                    total += piece.samples
                if total > max_samples:
                    raise_too_long(max_seconds)
            for piece in resampler.resample(None):
                pieces.append(piece.to_ndarray().reshape(-1))
    except DECODE_ERRORS as error:
        raise InvalidArgument(f"the audio is not readable {name} ({type(error).__name__})") from None
    if not pieces:
        raise InvalidArgument(f"the {name} audio holds no sound")
    return np.concatenate(pieces).astype("<i2", copy=False).tobytes()


def raise_too_long(max_seconds: float) -> None:
    raise InvalidArgument(f"the utterance plays longer than the limit of {max_seconds:g} seconds")


def wav_file(pcm16: bytes, sample_rate: int) -> bytes:
    """A complete WAV file holding the PCM16."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(PCM_SAMPLE_BYTES)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm16)
    return buffer.getvalue()


def ogg_opus_file(pcm16: bytes, sample_rate: int) -> bytes:
    """A complete Ogg Opus file holding the PCM16 (sample_rate: one of OPUS_SAMPLE_RATES)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=sample_rate, layout="mono")
        stream.bit_rate = OPUS_BIT_RATE
        samples = np.frombuffer(pcm16, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
