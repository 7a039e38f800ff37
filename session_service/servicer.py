"""SessionServicer: duplex.session.v1.SessionService over a SessionStore, translating protos <-> store."""

import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from duplex.common.errors import DuplexError, InvalidArgument
from duplex.session.v1 import session_pb2, session_pb2_grpc
from session_service.quota import QuotaStatus
from session_service.store import AppendOutcome, CancelRequest, EventBatch, LogEntry, SessionInfo, SessionStore

# How "unlimited" reads in QuotaStatus, whose fields cannot say it otherwise: the field's largest value.
UNLIMITED_MESSAGES = 2**32 - 1
UNLIMITED_TOKENS = 2**64 - 1
UNLIMITED_AUDIO_SECONDS = 2**64 - 1
# Voice options are a handful of settings (voice, speed, format...): a few hundred bytes. The bound keeps
# a session record small, whatever a caller sends; OpenSession and UpdateSession refuse more
# (INVALID_ARGUMENT), changing nothing.
MAX_VOICE_OPTIONS_BYTES = 4096
# AppendEventBatches takes at most this much per call (session.proto says so), which bounds one Redis script.
MAX_APPEND_BATCHES = 1000
MAX_APPEND_BATCH_EVENTS = 10_000


def _require(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def _check_voice_options(voice_options: bytes) -> None:
    if len(voice_options) > MAX_VOICE_OPTIONS_BYTES:
        raise InvalidArgument(f"voice_options: at most {MAX_VOICE_OPTIONS_BYTES} bytes, got {len(voice_options)}")


def _timestamp(epoch_seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(epoch_seconds * 1e9))
    return stamp


def _session_to_proto(info: SessionInfo) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=info.session_id,
        user_id=info.user_id,
        conversation_id=info.conversation_id,
        model=info.model,
        system_prompt=info.system_prompt,
        created_at=_timestamp(info.created_at),
        expires_at=_timestamp(info.expires_at),
        last_seq=info.last_seq,
        active_turn_id=info.active_turn_id,
        persona=info.persona,
        active_turn_owner=info.active_turn_owner,
        voice_options=info.voice_options,
    )


def _quota_to_proto(quota: QuotaStatus) -> session_pb2.QuotaStatus:
    return session_pb2.QuotaStatus(
        messages_remaining=UNLIMITED_MESSAGES if quota.messages_remaining is None else quota.messages_remaining,
        tokens_remaining=UNLIMITED_TOKENS if quota.tokens_remaining is None else quota.tokens_remaining,
        audio_seconds_remaining=(
            UNLIMITED_AUDIO_SECONDS if quota.audio_seconds_remaining is None else quota.audio_seconds_remaining
        ),
    )


def _entry_from_proto(event: session_pb2.LogEvent) -> LogEntry:
    return LogEntry(seq=event.seq, turn_id=event.turn_id, payload=event.payload, terminal=event.terminal)


def _check_append_batches(batches: Sequence[session_pb2.AppendEventsRequest]) -> None:
    """Refuse the whole request before anything is appended."""
    if len(batches) > MAX_APPEND_BATCHES:
        raise InvalidArgument(f"at most {MAX_APPEND_BATCHES} batches per call, got {len(batches)}")
    events = sum(len(batch.events) for batch in batches)
    if events > MAX_APPEND_BATCH_EVENTS:
        raise InvalidArgument(f"at most {MAX_APPEND_BATCH_EVENTS} events per call, got {events}")
    if not all(batch.session_id for batch in batches):
        raise InvalidArgument("every batch needs a session_id")


def _append_result_to_proto(outcome: AppendOutcome) -> session_pb2.AppendEventsResult:
    if isinstance(outcome, DuplexError):
        error = session_pb2.AppendEventsError(code=outcome.code.value[0], message=outcome.message)
        return session_pb2.AppendEventsResult(error=error)
    return session_pb2.AppendEventsResult(last_seq=outcome)


def _cancel_to_proto(request: CancelRequest) -> session_pb2.CancelRequested:
    return session_pb2.CancelRequested(
        session_id=request.session_id, turn_id=request.turn_id, interrupt=request.interrupt,
        played_ms=request.played_ms,
    )


def _entry_to_proto(entry: LogEntry) -> session_pb2.LogEvent:
    return session_pb2.LogEvent(seq=entry.seq, turn_id=entry.turn_id, payload=entry.payload, terminal=entry.terminal)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Validates requests and maps them onto the store; the store's domain errors become statuses in
    duplex.common.errors.ErrorInterceptor."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    async def OpenSession(
        self, request: session_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.OpenSessionResponse:
        _require(user_id=request.user_id)
        # Checked on a re-attach too, where they are ignored: an oversized request is malformed either way.
        _check_voice_options(request.voice_options)
        info, resumed = await self._store.open_session(
            request.user_id,
            request.session_id,
            conversation_id=request.conversation_id,
            model=request.model,
            system_prompt=request.system_prompt,
            persona=request.persona,
            voice_options=request.voice_options,
        )
        return session_pb2.OpenSessionResponse(session=_session_to_proto(info), resumed=resumed)

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetSessionResponse:
        _require(user_id=request.user_id, session_id=request.session_id)
        info = await self._store.get_session(request.user_id, request.session_id)
        return session_pb2.GetSessionResponse(session=_session_to_proto(info))

    async def UpdateSession(
        self, request: session_pb2.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.UpdateSessionResponse:
        _require(user_id=request.user_id, session_id=request.session_id)
        _check_voice_options(request.voice_options)
        info = await self._store.update_session(
            request.user_id, request.session_id, voice_options=request.voice_options
        )
        return session_pb2.UpdateSessionResponse(session=_session_to_proto(info))

    async def CloseSession(
        self, request: session_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.CloseSessionResponse:
        _require(user_id=request.user_id, session_id=request.session_id)
        await self._store.close_session(request.user_id, request.session_id)
        return session_pb2.CloseSessionResponse()

    async def BeginTurn(
        self, request: session_pb2.BeginTurnRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.BeginTurnResponse:
        _require(user_id=request.user_id, session_id=request.session_id, turn_id=request.turn_id)
        started = await self._store.begin_turn(
            request.user_id, request.session_id, request.turn_id, owner=request.owner, uses_audio=request.uses_audio
        )
        response = session_pb2.BeginTurnResponse(
            last_seq=started.last_seq, quota=_quota_to_proto(started.quota),
            taken_over_turn_id=started.taken_over_turn_id,
        )
        if started.cancel is not None:
            response.cancel_requested.CopyFrom(_cancel_to_proto(started.cancel))
        return response

    async def RequestCancel(
        self, request: session_pb2.RequestCancelRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.RequestCancelResponse:
        _require(user_id=request.user_id, session_id=request.session_id)
        turn_id = await self._store.request_cancel(
            request.user_id, request.session_id, request.turn_id, interrupt=request.interrupt,
            played_ms=request.played_ms,
        )
        return session_pb2.RequestCancelResponse(turn_id=turn_id)

    async def WatchCancels(
        self, request: session_pb2.WatchCancelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.WatchCancelsResponse]:
        _require(owner=request.owner)
        requests = self._store.watch_cancels(request.owner)
        async with contextlib.aclosing(requests):
            async for cancel in requests:
                if cancel is None:
                    yield session_pb2.WatchCancelsResponse()  # the watch is in place
                else:
                    yield session_pb2.WatchCancelsResponse(cancel=_cancel_to_proto(cancel))

    async def EndTurn(
        self, request: session_pb2.EndTurnRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.EndTurnResponse:
        _require(session_id=request.session_id, turn_id=request.turn_id)
        await self._store.end_turn(
            request.session_id, request.turn_id, tokens=request.tokens, audio_ms=request.audio_ms,
            unanswered=request.unanswered,
        )
        return session_pb2.EndTurnResponse()

    async def AppendEvents(
        self, request: session_pb2.AppendEventsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendEventsResponse:
        _require(session_id=request.session_id)
        events = [_entry_from_proto(event) for event in request.events]
        last_seq = await self._store.append_events(request.session_id, events)
        return session_pb2.AppendEventsResponse(last_seq=last_seq)

    async def AppendEventBatches(
        self, request: session_pb2.AppendEventBatchesRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AppendEventBatchesResponse:
        _check_append_batches(request.batches)
        batches = [
            EventBatch(batch.session_id, [_entry_from_proto(event) for event in batch.events])
            for batch in request.batches
        ]
        outcomes = await self._store.append_event_batches(batches)
        return session_pb2.AppendEventBatchesResponse(results=[_append_result_to_proto(o) for o in outcomes])

    async def ReadEvents(
        self, request: session_pb2.ReadEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.ReadEventsResponse]:
        _require(user_id=request.user_id, session_id=request.session_id)
        batches = self._store.read_events(request.user_id, request.session_id, request.after_seq, follow=request.follow)
        # aclosing: when the client goes away, the store's reader is closed now, not whenever GC runs.
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield session_pb2.ReadEventsResponse(events=[_entry_to_proto(entry) for entry in batch])
