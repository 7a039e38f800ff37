import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Session(_message.Message):
    __slots__ = ("session_id", "user_id", "conversation_id", "model", "system_prompt", "created_at", "expires_at", "last_seq", "active_turn_id", "persona", "active_turn_owner", "voice_options")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TURN_OWNER_FIELD_NUMBER: _ClassVar[int]
    VOICE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    user_id: str
    conversation_id: str
    model: str
    system_prompt: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    last_seq: int
    active_turn_id: str
    persona: str
    active_turn_owner: str
    voice_options: bytes
    def __init__(self, session_id: _Optional[str] = ..., user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., active_turn_id: _Optional[str] = ..., persona: _Optional[str] = ..., active_turn_owner: _Optional[str] = ..., voice_options: _Optional[bytes] = ...) -> None: ...

class QuotaStatus(_message.Message):
    __slots__ = ("messages_remaining", "tokens_remaining", "audio_seconds_remaining")
    MESSAGES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_REMAINING_FIELD_NUMBER: _ClassVar[int]
    messages_remaining: int
    tokens_remaining: int
    audio_seconds_remaining: int
    def __init__(self, messages_remaining: _Optional[int] = ..., tokens_remaining: _Optional[int] = ..., audio_seconds_remaining: _Optional[int] = ...) -> None: ...

class LogEvent(_message.Message):
    __slots__ = ("seq", "turn_id", "payload", "terminal")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    turn_id: str
    payload: bytes
    terminal: bool
    def __init__(self, seq: _Optional[int] = ..., turn_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., terminal: _Optional[bool] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "conversation_id", "model", "system_prompt", "persona", "voice_options")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    VOICE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    conversation_id: str
    model: str
    system_prompt: str
    persona: str
    voice_options: bytes
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., persona: _Optional[str] = ..., voice_options: _Optional[bytes] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session", "resumed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    resumed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., resumed: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("user_id", "session_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("user_id", "session_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BeginTurnRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "turn_id", "owner", "uses_audio")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    USES_AUDIO_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    turn_id: str
    owner: str
    uses_audio: bool
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., owner: _Optional[str] = ..., uses_audio: _Optional[bool] = ...) -> None: ...

class BeginTurnResponse(_message.Message):
    __slots__ = ("last_seq", "quota", "taken_over_turn_id", "cancel_requested")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    TAKEN_OVER_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    quota: QuotaStatus
    taken_over_turn_id: str
    cancel_requested: CancelRequested
    def __init__(self, last_seq: _Optional[int] = ..., quota: _Optional[_Union[QuotaStatus, _Mapping]] = ..., taken_over_turn_id: _Optional[str] = ..., cancel_requested: _Optional[_Union[CancelRequested, _Mapping]] = ...) -> None: ...

class EndTurnRequest(_message.Message):
    __slots__ = ("session_id", "turn_id", "tokens", "audio_ms", "unanswered")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    UNANSWERED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    tokens: int
    audio_ms: int
    unanswered: bool
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., tokens: _Optional[int] = ..., audio_ms: _Optional[int] = ..., unanswered: _Optional[bool] = ...) -> None: ...

class EndTurnResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AppendEventsRequest(_message.Message):
    __slots__ = ("session_id", "events")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    events: _containers.RepeatedCompositeFieldContainer[LogEvent]
    def __init__(self, session_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[LogEvent, _Mapping]]] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("last_seq",)
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    def __init__(self, last_seq: _Optional[int] = ...) -> None: ...

class AppendEventBatchesRequest(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[AppendEventsRequest]
    def __init__(self, batches: _Optional[_Iterable[_Union[AppendEventsRequest, _Mapping]]] = ...) -> None: ...

class AppendEventBatchesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AppendEventsResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AppendEventsResult, _Mapping]]] = ...) -> None: ...

class AppendEventsResult(_message.Message):
    __slots__ = ("last_seq", "error")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    error: AppendEventsError
    def __init__(self, last_seq: _Optional[int] = ..., error: _Optional[_Union[AppendEventsError, _Mapping]] = ...) -> None: ...

class AppendEventsError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ReadEventsRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "after_seq", "follow")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    after_seq: int
    follow: bool
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class ReadEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[LogEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[LogEvent, _Mapping]]] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "voice_options")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    voice_options: bytes
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., voice_options: _Optional[bytes] = ...) -> None: ...

class UpdateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class RequestCancelRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "turn_id", "interrupt", "played_ms")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    turn_id: str
    interrupt: bool
    played_ms: int
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., interrupt: _Optional[bool] = ..., played_ms: _Optional[int] = ...) -> None: ...

class RequestCancelResponse(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class WatchCancelsRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class WatchCancelsResponse(_message.Message):
    __slots__ = ("cancel",)
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    cancel: CancelRequested
    def __init__(self, cancel: _Optional[_Union[CancelRequested, _Mapping]] = ...) -> None: ...

class CancelRequested(_message.Message):
    __slots__ = ("session_id", "turn_id", "interrupt", "played_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turn_id: str
    interrupt: bool
    played_ms: int
    def __init__(self, session_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., interrupt: _Optional[bool] = ..., played_ms: _Optional[int] = ...) -> None: ...
