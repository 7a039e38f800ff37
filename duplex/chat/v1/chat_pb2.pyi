import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM16: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_WAV: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_WEBM_OPUS: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_OGG_OPUS: _ClassVar[AudioEncoding]

class TurnDetection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_DETECTION_UNSPECIFIED: _ClassVar[TurnDetection]
    TURN_DETECTION_MANUAL: _ClassVar[TurnDetection]
    TURN_DETECTION_SERVER_VAD: _ClassVar[TurnDetection]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CONTENT_FILTER: _ClassVar[FinishReason]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM16: AudioEncoding
AUDIO_ENCODING_WAV: AudioEncoding
AUDIO_ENCODING_WEBM_OPUS: AudioEncoding
AUDIO_ENCODING_OGG_OPUS: AudioEncoding
TURN_DETECTION_UNSPECIFIED: TurnDetection
TURN_DETECTION_MANUAL: TurnDetection
TURN_DETECTION_SERVER_VAD: TurnDetection
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CONTENT_FILTER: FinishReason

class ChatRequest(_message.Message):
    __slots__ = ("open", "message", "cancel", "ping", "audio", "commit", "interrupt", "update_session")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_SESSION_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    message: UserMessage
    cancel: Cancel
    ping: Ping
    audio: AudioInput
    commit: CommitAudio
    interrupt: Interrupt
    update_session: SessionUpdate
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., message: _Optional[_Union[UserMessage, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., audio: _Optional[_Union[AudioInput, _Mapping]] = ..., commit: _Optional[_Union[CommitAudio, _Mapping]] = ..., interrupt: _Optional[_Union[Interrupt, _Mapping]] = ..., update_session: _Optional[_Union[SessionUpdate, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "conversation_id", "model", "system_prompt", "resume_after_seq", "persona", "voice")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    conversation_id: str
    model: str
    system_prompt: str
    resume_after_seq: int
    persona: str
    voice: VoiceOptions
    def __init__(self, session_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., resume_after_seq: _Optional[int] = ..., persona: _Optional[str] = ..., voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class VoiceOptions(_message.Message):
    __slots__ = ("speak_answers", "output_format", "voice", "speech_model", "input_format", "language", "turn_detection", "transcription_model")
    SPEAK_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SPEECH_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TURN_DETECTION_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPTION_MODEL_FIELD_NUMBER: _ClassVar[int]
    speak_answers: bool
    output_format: AudioFormat
    voice: str
    speech_model: str
    input_format: AudioFormat
    language: str
    turn_detection: TurnDetection
    transcription_model: str
    def __init__(self, speak_answers: _Optional[bool] = ..., output_format: _Optional[_Union[AudioFormat, _Mapping]] = ..., voice: _Optional[str] = ..., speech_model: _Optional[str] = ..., input_format: _Optional[_Union[AudioFormat, _Mapping]] = ..., language: _Optional[str] = ..., turn_detection: _Optional[_Union[TurnDetection, str]] = ..., transcription_model: _Optional[str] = ...) -> None: ...

class SessionUpdate(_message.Message):
    __slots__ = ("voice",)
    VOICE_FIELD_NUMBER: _ClassVar[int]
    voice: VoiceOptions
    def __init__(self, voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class AudioInput(_message.Message):
    __slots__ = ("data", "client_message_id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    client_message_id: str
    def __init__(self, data: _Optional[bytes] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class CommitAudio(_message.Message):
    __slots__ = ("client_message_id",)
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    client_message_id: str
    def __init__(self, client_message_id: _Optional[str] = ...) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ("turn_id", "played_ms")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    played_ms: int
    def __init__(self, turn_id: _Optional[str] = ..., played_ms: _Optional[int] = ...) -> None: ...

class UserMessage(_message.Message):
    __slots__ = ("client_message_id", "text")
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    client_message_id: str
    text: str
    def __init__(self, client_message_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    def __init__(self, nonce: _Optional[str] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: ChatEvent
    def __init__(self, event: _Optional[_Union[ChatEvent, _Mapping]] = ...) -> None: ...

class SendMessageRequest(_message.Message):
    __slots__ = ("session_id", "message", "conversation_id", "model", "system_prompt", "persona", "voice")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: UserMessage
    conversation_id: str
    model: str
    system_prompt: str
    persona: str
    voice: VoiceOptions
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[_Union[UserMessage, _Mapping]] = ..., conversation_id: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., persona: _Optional[str] = ..., voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: ChatEvent
    def __init__(self, event: _Optional[_Union[ChatEvent, _Mapping]] = ...) -> None: ...

class CancelTurnRequest(_message.Message):
    __slots__ = ("session_id", "turn_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class CancelTurnResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class ResumeStreamRequest(_message.Message):
    __slots__ = ("session_id", "after_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    after_seq: int
    def __init__(self, session_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ResumeStreamResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: ChatEvent
    def __init__(self, event: _Optional[_Union[ChatEvent, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SendAudioRequest(_message.Message):
    __slots__ = ("session_id", "data", "client_message_id", "commit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    data: bytes
    client_message_id: str
    commit: bool
    def __init__(self, session_id: _Optional[str] = ..., data: _Optional[bytes] = ..., client_message_id: _Optional[str] = ..., commit: _Optional[bool] = ...) -> None: ...

class SendAudioResponse(_message.Message):
    __slots__ = ("buffered_bytes", "client_message_id")
    BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    buffered_bytes: int
    client_message_id: str
    def __init__(self, buffered_bytes: _Optional[int] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session_id", "voice")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    voice: VoiceOptions
    def __init__(self, session_id: _Optional[str] = ..., voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class UpdateSessionResponse(_message.Message):
    __slots__ = ("voice",)
    VOICE_FIELD_NUMBER: _ClassVar[int]
    voice: VoiceOptions
    def __init__(self, voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class ChatEvent(_message.Message):
    __slots__ = ("seq", "session_id", "turn_id", "time", "session_opened", "message_accepted", "turn_started", "delta", "tool_call", "tool_result", "turn_completed", "turn_cancelled", "error", "pong", "quota", "speech_started", "speech_stopped", "transcript", "audio", "session_updated")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_OPENED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TURN_STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    TURN_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TURN_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STOPPED_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SESSION_UPDATED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    session_id: str
    turn_id: str
    time: _timestamp_pb2.Timestamp
    session_opened: SessionOpened
    message_accepted: MessageAccepted
    turn_started: TurnStarted
    delta: TextDelta
    tool_call: ToolCall
    tool_result: ToolResult
    turn_completed: TurnCompleted
    turn_cancelled: TurnCancelled
    error: ChatError
    pong: Pong
    quota: QuotaUpdate
    speech_started: SpeechStarted
    speech_stopped: SpeechStopped
    transcript: Transcript
    audio: AudioOutput
    session_updated: SessionUpdated
    def __init__(self, seq: _Optional[int] = ..., session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., message_accepted: _Optional[_Union[MessageAccepted, _Mapping]] = ..., turn_started: _Optional[_Union[TurnStarted, _Mapping]] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., turn_completed: _Optional[_Union[TurnCompleted, _Mapping]] = ..., turn_cancelled: _Optional[_Union[TurnCancelled, _Mapping]] = ..., error: _Optional[_Union[ChatError, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., quota: _Optional[_Union[QuotaUpdate, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_stopped: _Optional[_Union[SpeechStopped, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., audio: _Optional[_Union[AudioOutput, _Mapping]] = ..., session_updated: _Optional[_Union[SessionUpdated, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "conversation_id", "resumed", "model", "persona", "last_seq", "voice")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    conversation_id: str
    resumed: bool
    model: str
    persona: str
    last_seq: int
    voice: VoiceOptions
    def __init__(self, session_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., resumed: _Optional[bool] = ..., model: _Optional[str] = ..., persona: _Optional[str] = ..., last_seq: _Optional[int] = ..., voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class MessageAccepted(_message.Message):
    __slots__ = ("message_id", "client_message_id", "duplicate")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    client_message_id: str
    duplicate: bool
    def __init__(self, message_id: _Optional[str] = ..., client_message_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class TurnStarted(_message.Message):
    __slots__ = ("user_message_id", "model")
    USER_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_message_id: str
    model: str
    def __init__(self, user_message_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("call_id", "name", "arguments_json")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    arguments_json: str
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("call_id", "name", "result_json", "is_error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    result_json: str
    is_error: bool
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., result_json: _Optional[str] = ..., is_error: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "audio_input_ms", "audio_output_ms")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_INPUT_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OUTPUT_MS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    audio_input_ms: int
    audio_output_ms: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., audio_input_ms: _Optional[int] = ..., audio_output_ms: _Optional[int] = ...) -> None: ...

class TurnCompleted(_message.Message):
    __slots__ = ("finish_reason", "usage", "time_to_first_token", "tokens_per_second", "assistant_message_id", "saved_later")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SAVED_LATER_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    time_to_first_token: _duration_pb2.Duration
    tokens_per_second: float
    assistant_message_id: str
    saved_later: bool
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tokens_per_second: _Optional[float] = ..., assistant_message_id: _Optional[str] = ..., saved_later: _Optional[bool] = ...) -> None: ...

class TurnCancelled(_message.Message):
    __slots__ = ("usage", "assistant_message_id", "interrupted", "played_ms", "heard_chars", "saved_later")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    HEARD_CHARS_FIELD_NUMBER: _ClassVar[int]
    SAVED_LATER_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    assistant_message_id: str
    interrupted: bool
    played_ms: int
    heard_chars: int
    saved_later: bool
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., assistant_message_id: _Optional[str] = ..., interrupted: _Optional[bool] = ..., played_ms: _Optional[int] = ..., heard_chars: _Optional[int] = ..., saved_later: _Optional[bool] = ...) -> None: ...

class ChatError(_message.Message):
    __slots__ = ("code", "message", "retryable", "retry_after")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retryable: bool
    retry_after: _duration_pb2.Duration
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class QuotaUpdate(_message.Message):
    __slots__ = ("messages_remaining", "tokens_remaining", "audio_seconds_remaining")
    MESSAGES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    messages_remaining: int
    tokens_remaining: int
    audio_seconds_remaining: int
    def __init__(self, messages_remaining: _Optional[int] = ..., tokens_remaining: _Optional[int] = ..., audio_seconds_remaining: _Optional[int] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("audio_ms",)
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    audio_ms: int
    def __init__(self, audio_ms: _Optional[int] = ...) -> None: ...

class SpeechStopped(_message.Message):
    __slots__ = ("audio_ms",)
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    audio_ms: int
    def __init__(self, audio_ms: _Optional[int] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "final", "client_message_id", "audio_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    final: bool
    client_message_id: str
    audio_ms: int
    def __init__(self, text: _Optional[str] = ..., final: _Optional[bool] = ..., client_message_id: _Optional[str] = ..., audio_ms: _Optional[int] = ...) -> None: ...

class AudioOutput(_message.Message):
    __slots__ = ("format", "data", "duration_ms", "offset_ms", "text_start", "text_end")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_START_FIELD_NUMBER: _ClassVar[int]
    TEXT_END_FIELD_NUMBER: _ClassVar[int]
    format: AudioFormat
    data: bytes
    duration_ms: int
    offset_ms: int
    text_start: int
    text_end: int
    def __init__(self, format: _Optional[_Union[AudioFormat, _Mapping]] = ..., data: _Optional[bytes] = ..., duration_ms: _Optional[int] = ..., offset_ms: _Optional[int] = ..., text_start: _Optional[int] = ..., text_end: _Optional[int] = ...) -> None: ...

class SessionUpdated(_message.Message):
    __slots__ = ("voice",)
    VOICE_FIELD_NUMBER: _ClassVar[int]
    voice: VoiceOptions
    def __init__(self, voice: _Optional[_Union[VoiceOptions, _Mapping]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    def __init__(self, nonce: _Optional[str] = ...) -> None: ...
