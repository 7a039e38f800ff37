"""Voice in the gateway: a session's voice options, the Speaker that speaks one turn's answer, and the
VoiceInput that turns a session's incoming audio into voice turns.

A voice turn begins when the user starts speaking (server VAD) or sends the utterance's first audio
(push-to-talk), so every event about the utterance (speech_started, transcripts) is a logged event of that
turn and reaches every replica's followers like any other. Its final transcript becomes the user message.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import DuplexError, FailedPrecondition, InvalidArgument, Unavailable
from duplex.llm.v1 import llm_pb2
from gateway.clients import LlmClient, SpeechCall

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 128
MAX_LANGUAGE_CHARS = 16
# Sample rates the speech engines accept; outside them a rate is a mistake, not a format.
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
DEFAULT_INPUT_RATE_HZ = 16000
# Responses of a Transcribe call waiting for the input's reader; the engine produces a few per utterance.
TRANSCRIBE_BACKLOG = 64


def parse_voice_options(data: bytes) -> chat_pb2.VoiceOptions:
    """The session's stored options; a session that never set them has the defaults."""
    return chat_pb2.VoiceOptions.FromString(data) if data else chat_pb2.VoiceOptions()


def validate_voice_options(options: chat_pb2.VoiceOptions) -> None:
    for name in ("voice", "speech_model", "transcription_model"):
        if len(getattr(options, name)) > MAX_NAME_CHARS:
            raise InvalidArgument(f"voice.{name} is longer than {MAX_NAME_CHARS} characters")
    if len(options.language) > MAX_LANGUAGE_CHARS:
        raise InvalidArgument(f"voice.language is longer than {MAX_LANGUAGE_CHARS} characters")
    _validate_format("voice.input_format", options.input_format)
    _validate_format("voice.output_format", options.output_format)
    if options.turn_detection not in chat_pb2.TurnDetection.values():
        raise InvalidArgument("voice.turn_detection is not a known turn detection mode")
    if is_server_vad(options) and input_encoding(options) != chat_pb2.AUDIO_ENCODING_PCM16:
        raise InvalidArgument("server VAD needs PCM16 input; containers (WAV, WebM, Ogg) need push-to-talk")


def _validate_format(name: str, audio_format: chat_pb2.AudioFormat) -> None:
    if audio_format.encoding not in chat_pb2.AudioEncoding.values():
        raise InvalidArgument(f"{name}.encoding is not a known audio encoding")
    rate = audio_format.sample_rate_hz
    if rate and not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise InvalidArgument(f"{name}.sample_rate_hz must be between {MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ}")


def is_server_vad(options: chat_pb2.VoiceOptions) -> bool:
    return options.turn_detection == chat_pb2.TURN_DETECTION_SERVER_VAD


def input_encoding(options: chat_pb2.VoiceOptions) -> int:
    return options.input_format.encoding or chat_pb2.AUDIO_ENCODING_PCM16


def _llm_format(audio_format: chat_pb2.AudioFormat) -> llm_pb2.AudioFormat:
    # The two enums are kept value for value (chat.proto and llm.proto).
    return llm_pb2.AudioFormat(encoding=audio_format.encoding, sample_rate_hz=audio_format.sample_rate_hz)


def _chat_format(audio_format: llm_pb2.AudioFormat) -> chat_pb2.AudioFormat:
    return chat_pb2.AudioFormat(encoding=audio_format.encoding, sample_rate_hz=audio_format.sample_rate_hz)


def transcribe_config(options: chat_pb2.VoiceOptions) -> llm_pb2.TranscribeConfig:
    audio_format = _llm_format(options.input_format)
    if not audio_format.encoding:
        audio_format.encoding = llm_pb2.AUDIO_ENCODING_PCM16
    if audio_format.encoding == llm_pb2.AUDIO_ENCODING_PCM16 and not audio_format.sample_rate_hz:
        audio_format.sample_rate_hz = DEFAULT_INPUT_RATE_HZ
    return llm_pb2.TranscribeConfig(
        model=options.transcription_model, format=audio_format, language=options.language,
        turn_detection=options.turn_detection or llm_pb2.TURN_DETECTION_MANUAL, interim_results=True,
    )


@dataclass
class _Spoken:
    end_ms: int
    text_end: int


class Speaker:
    """Speaks one turn's answer. Text goes to a Synthesize call as the model writes it; audio comes back as
    audio events, sent at most `lead` ahead of play-out time, so an interrupt stops speech that is still
    queued here, and `finish()` returns once the whole answer has had time to play."""

    def __init__(
        self, llm: LlmClient, options: chat_pb2.VoiceOptions, publish: Callable[[chat_pb2.ChatEvent], None],
        on_failure: Callable[[DuplexError], None], lead_seconds: float, timeout: float,
    ):
        self._call: SpeechCall = llm.synthesize(timeout)
        self._options = options
        self._publish = publish
        self._on_failure = on_failure
        self._lead = lead_seconds
        self._loop = asyncio.get_running_loop()
        self._pending = ""  # text written by the model and not yet sent to the call
        self._more = asyncio.Event()
        self._no_more_text = False
        self._stopped = False
        self.audio_ms = 0
        self._spoken: list[_Spoken] = []
        self._first_audio_at: float | None = None  # loop time the turn's first audio went out
        self._writer = asyncio.create_task(self._write(), name="speaker-writer")
        self._reader = asyncio.create_task(self._read(), name="speaker-reader")

    def say(self, text: str) -> None:
        self._pending += text
        self._more.set()

    async def finish(self) -> None:
        """No more text: wait until all of it is spoken and at most `lead` of it is left to play, so an
        interrupt until then still finds the turn running."""
        self._no_more_text = True
        self._more.set()
        try:
            await asyncio.shield(self._reader)
        except DuplexError as error:
            raise _speech_failure(error) from None
        if self._first_audio_at is not None:
            played_out_at = self._first_audio_at + self.audio_ms / 1000 - self._lead
            await asyncio.sleep(max(0.0, played_out_at - self._loop.time()))

    def played_ms(self) -> int:
        """The server's estimate of what the client has played: the time since the first audio went out."""
        if self._first_audio_at is None:
            return 0
        return min(self.audio_ms, int((self._loop.time() - self._first_audio_at) * 1000))

    def heard_chars(self, played_ms: int) -> int:
        """How much of the answer text the audio played by `played_ms` speaks (whole chunks only)."""
        heard = 0
        for spoken in self._spoken:
            if spoken.end_ms > played_ms:
                break
            heard = spoken.text_end
        return heard

    def stop(self) -> None:
        """Stop speaking at once: no audio event follows, and the upstream request is closed."""
        self._stopped = True
        self._call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()

    async def close(self) -> None:
        self.stop()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    async def _write(self) -> None:
        try:
            config = llm_pb2.SynthesizeConfig(
                model=self._options.speech_model, voice=self._options.voice,
                format=_llm_format(self._options.output_format),
            )
            await self._call.write(llm_pb2.SynthesizeRequest(config=config))
            while True:
                await self._more.wait()
                self._more.clear()
                text, self._pending = self._pending, ""
                if text:
                    await self._call.write(llm_pb2.SynthesizeRequest(text=text))
                if self._no_more_text and not self._pending:
                    await self._call.done_writing()
                    return
        except DuplexError:
            self._call.cancel()  # the reader reports the call's own error

    async def _read(self) -> None:
        audio_format = chat_pb2.AudioFormat()
        try:
            async for response in self._call:
                kind = response.WhichOneof("kind")
                if kind == "started":
                    audio_format = _chat_format(response.started.format)
                elif kind == "audio":
                    await self._send_audio(response.audio, audio_format)
        except DuplexError as error:
            if not self._stopped:
                self._on_failure(_speech_failure(error))
            raise

    async def _send_audio(self, chunk: llm_pb2.AudioChunk, audio_format: chat_pb2.AudioFormat) -> None:
        now = self._loop.time()
        if self._first_audio_at is None:
            self._first_audio_at = now
        due = self._first_audio_at + self.audio_ms / 1000 - self._lead
        if due > now:
            await asyncio.sleep(due - now)
        if self._stopped:
            return
        audio = chat_pb2.AudioOutput(
            format=audio_format, data=chunk.data, duration_ms=chunk.duration_ms, offset_ms=self.audio_ms,
            text_start=chunk.text_start, text_end=chunk.text_end,
        )
        self.audio_ms += chunk.duration_ms
        self._spoken.append(_Spoken(self.audio_ms, chunk.text_end))
        self._publish(chat_pb2.ChatEvent(audio=audio))


def _speech_failure(error: DuplexError) -> DuplexError:
    """A speech upstream failing mid-answer: retryable, the text is kept."""
    if isinstance(error, InvalidArgument):
        return error  # a voice or format the speech model does not have: the client must change it
    return Unavailable(f"speaking the answer failed: {error.message}")


@dataclass
class Utterance:
    """What the voice input hands its turn: the final transcript, or why there is none."""

    client_message_id: str
    # False while the id is the server's own; the client may still name the utterance in its commit.
    named_by_client: bool = True
    started_at: float = field(default_factory=time.monotonic)
    audio_ms: int = 0
    _heard: asyncio.Future = field(default_factory=lambda: _retrieved(asyncio.get_running_loop().create_future()))

    def heard(self, text: str, audio_ms: int) -> None:
        self.audio_ms = audio_ms
        if not self._heard.done():
            self._heard.set_result(text)

    def failed(self, error: DuplexError) -> None:
        if not self._heard.done():
            self._heard.set_exception(error)

    async def transcript(self) -> str:
        return await self._heard


def _retrieved(future: asyncio.Future) -> asyncio.Future:
    """A future whose failure nobody may await (its turn was cancelled meanwhile) without a warning."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


# Begins a voice turn for an utterance (TurnManager.begin_voice_turn bound to a hub and session): returns
# the turn, whose events the input publishes through `turn.publish_voice`.
BeginVoiceTurn = Callable[[Utterance], Awaitable["VoiceTurn"]]


class VoiceTurn:
    """What the voice input needs of a turn (gateway.turn.Turn)."""

    id: str
    utterance: Utterance | None

    def publish_voice(self, event: chat_pb2.ChatEvent) -> None: ...

    def interrupt(self, played_ms: int | None) -> bool: ...

    async def wait_finished(self) -> None: ...


class _Hearing:
    """One Transcribe call and the utterance it is hearing now (push-to-talk: one utterance per call;
    server VAD: one call for every utterance while audio flows)."""

    def __init__(self, call: SpeechCall):
        self.call = call
        self.utterance: Utterance | None = None
        self.turn: VoiceTurn | None = None
        self.reader: asyncio.Task | None = None

    def publish(self, event: chat_pb2.ChatEvent) -> None:
        if self.turn is not None:
            self.turn.publish_voice(event)

    def end_utterance(self, error: DuplexError | None = None) -> None:
        if self.utterance is not None and error is not None:
            self.utterance.failed(error)
        self.utterance, self.turn = None, None


class VoiceInput:
    """One session's incoming audio on this replica: the Transcribe call hearing it, the utterance and the
    voice turn it belongs to. Owned by VoiceInputs; audio and commits are handled one at a time, in order."""

    def __init__(
        self, hub, options: chat_pb2.VoiceOptions, llm: LlmClient, settings, begin_turn: BeginVoiceTurn,
    ):
        self.hub = hub  # the session's gateway.hub.SessionHub, held (acquired) while this input lives
        self.session_id = hub.session_id
        self.options = options
        self._llm = llm
        self._settings = settings
        self._begin_turn = begin_turn
        self._hearing: _Hearing | None = None
        self._readers: set[asyncio.Task] = set()
        self._next_id = ""  # a client-chosen id for the next utterance
        self._bytes = 0  # audio since the utterance (or, with VAD, the call) began
        self._lock = asyncio.Lock()
        self.last_audio_at = time.monotonic()
        self.closed = False

    @property
    def utterance_id(self) -> str:
        hearing = self._hearing
        if hearing is not None and hearing.utterance is not None:
            return hearing.utterance.client_message_id
        return self._next_id

    async def add(self, data: bytes, client_message_id: str = "") -> int:
        """Add audio to the current utterance; returns its bytes so far."""
        limit = self._settings.voice_max_audio_chunk_bytes
        if len(data) > limit:
            raise InvalidArgument(f"an audio chunk is larger than {limit} bytes")
        async with self._lock:
            self._check_open()
            self.last_audio_at = time.monotonic()
            self._name_next(client_message_id)
            hearing = await self._current_hearing()
            self._bytes += len(data)
            if self._bytes > self._settings.voice_max_utterance_bytes:
                error = InvalidArgument(f"an utterance is at most {self._settings.voice_max_utterance_bytes} bytes")
                self._drop(error)
                raise error
            if data:
                await hearing.call.write(llm_pb2.TranscribeRequest(audio=data))
            return self._bytes

    async def commit(self, client_message_id: str = "") -> str:
        """End the current utterance now; its final transcript starts the answer. Returns its id."""
        async with self._lock:
            self._check_open()
            self._name_next(client_message_id)
            hearing = self._hearing
            if hearing is None:
                raise FailedPrecondition("there is no audio to commit")
            if client_message_id and hearing.utterance is not None and not hearing.utterance.named_by_client:
                hearing.utterance.client_message_id = client_message_id
                hearing.utterance.named_by_client = True
            utterance_id = self.utterance_id
            if is_server_vad(self.options):
                await hearing.call.write(llm_pb2.TranscribeRequest(commit=llm_pb2.TranscribeCommit()))
            else:
                # Push-to-talk: half-closing the call ends the utterance; the next audio opens a new call.
                self._hearing = None
                await hearing.call.done_writing()
            self._bytes = 0
            return utterance_id

    def is_idle(self, now: float) -> bool:
        return now - self.last_audio_at > self._settings.voice_input_idle_seconds

    async def close(self, reason: DuplexError | None = None) -> None:
        """Drop the input and wait for its calls: an utterance still being heard ends its turn with `reason`."""
        self.closed = True
        self._drop(reason or Unavailable("the utterance was abandoned: no audio came for a while"))
        await asyncio.gather(*self._readers, return_exceptions=True)

    def _name_next(self, client_message_id: str) -> None:
        hearing = self._hearing
        if client_message_id and (hearing is None or hearing.utterance is None):
            self._next_id = client_message_id

    def _check_open(self) -> None:
        if self.closed:
            raise Unavailable("this voice input was closed; send the audio again")

    async def _current_hearing(self) -> _Hearing:
        hearing = self._hearing
        if hearing is None:
            hearing = _Hearing(self._llm.transcribe(self._settings.turn_timeout_seconds))
            self._hearing = hearing
            try:
                if not is_server_vad(self.options):
                    await self._begin_utterance(hearing)
                await hearing.call.write(llm_pb2.TranscribeRequest(config=transcribe_config(self.options)))
            except BaseException:
                self._hearing = None
                hearing.call.cancel()
                raise
            hearing.reader = asyncio.create_task(self._read(hearing), name=f"voice-input-{self.session_id}")
            self._readers.add(hearing.reader)
            hearing.reader.add_done_callback(self._readers.discard)
        return hearing

    async def _begin_utterance(self, hearing: _Hearing) -> None:
        """Start the turn the coming speech belongs to; an answer still running is interrupted (barge-in)."""
        running = self.hub.turn
        if running is not None:
            running.interrupt(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.rpc_timeout_seconds):
                    await running.wait_finished()
        utterance = Utterance(self._next_id or f"utterance-{uuid.uuid4().hex}", named_by_client=bool(self._next_id))
        self._next_id = ""
        hearing.turn = await self._begin_turn(utterance)
        hearing.utterance = utterance

    async def _read(self, hearing: _Hearing) -> None:
        """Relay the call's speech events to the utterance's turn; its final transcript ends the utterance."""
        try:
            async for response in hearing.call:
                await self._on_response(hearing, response)
            hearing.end_utterance(Unavailable("the transcription ended before the utterance did"))
        except DuplexError as error:
            hearing.end_utterance(error)
        except BaseException:
            hearing.end_utterance(Unavailable("the voice input stopped"))
            raise
        finally:
            if self._hearing is hearing:
                self._hearing, self._bytes = None, 0

    async def _on_response(self, hearing: _Hearing, response: llm_pb2.TranscribeResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "speech_started":
            if hearing.utterance is None:
                await self._begin_utterance(hearing)
            hearing.publish(chat_pb2.ChatEvent(speech_started=chat_pb2.SpeechStarted(
                audio_ms=response.speech_started.audio_ms
            )))
        elif kind == "speech_stopped":
            hearing.publish(chat_pb2.ChatEvent(speech_stopped=chat_pb2.SpeechStopped(
                audio_ms=response.speech_stopped.audio_ms
            )))
        elif kind == "transcript" and hearing.utterance is not None:
            # (With VAD, a transcript of audio in which no speech was detected has no utterance: dropped.)
            transcript, utterance = response.transcript, hearing.utterance
            hearing.publish(chat_pb2.ChatEvent(transcript=chat_pb2.Transcript(
                text=transcript.text, final=transcript.final, client_message_id=utterance.client_message_id,
                audio_ms=transcript.audio_ms,
            )))
            if transcript.final:
                utterance.heard(transcript.text.strip(), transcript.audio_ms)
                hearing.end_utterance()
                self._bytes = 0

    def _drop(self, error: DuplexError) -> None:
        hearing, self._hearing = self._hearing, None
        self._bytes = 0
        if hearing is not None:
            hearing.end_utterance(error)
            hearing.call.cancel()


class VoiceInputs:
    """The voice inputs of the sessions receiving audio on this replica, and the task that drops idle ones."""

    def __init__(self, hubs, check_interval: float):
        self._hubs = hubs  # gateway.hub.HubRegistry: each input holds its session's hub
        self._inputs: dict[str, VoiceInput] = {}
        self._check_interval = check_interval
        self._sweeper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_periodically(), name="voice-input-sweeper")

    def get(self, session_id: str) -> VoiceInput | None:
        found = self._inputs.get(session_id)
        return found if found is not None and not found.closed else None

    def open(self, hub, options: chat_pb2.VoiceOptions, llm: LlmClient, settings, begin_turn) -> VoiceInput:
        """The session's input, made with `options` unless one with the same options is open."""
        found = self.get(hub.session_id)
        if found is not None and found.options == options:
            return found
        if found is not None:
            self._closing(found, Unavailable("the session's voice options changed; speak again"))
        self._hubs.acquire(hub.session_id, hub.user_id, hub.last_seq)
        voice_input = VoiceInput(hub, options, llm, settings, begin_turn)
        self._inputs[hub.session_id] = voice_input
        return voice_input

    def _closing(self, voice_input: VoiceInput, reason: DuplexError | None) -> asyncio.Task:
        """Take the input out now and close it in the background (owned by the sweeper's set)."""
        if self._inputs.get(voice_input.session_id) is voice_input:
            del self._inputs[voice_input.session_id]
        task = asyncio.create_task(self._close(voice_input, reason), name="voice-input-close")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _close(self, voice_input: VoiceInput, reason: DuplexError | None) -> None:
        try:
            await voice_input.close(reason)
        finally:
            await self._hubs.release(voice_input.hub)

    async def discard(self, session_id: str, reason: DuplexError | None = None) -> None:
        voice_input = self._inputs.get(session_id)
        if voice_input is not None:
            await self._closing(voice_input, reason)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        stopping = Unavailable("the server is stopping; send the utterance again")
        await asyncio.gather(*(self.discard(sid, stopping) for sid in list(self._inputs)))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            now = time.monotonic()
            idle = [sid for sid, voice_input in self._inputs.items() if voice_input.is_idle(now) or voice_input.closed]
            await asyncio.gather(*(self.discard(sid) for sid in idle))
