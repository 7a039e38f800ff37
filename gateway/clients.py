"""Typed clients for the inner services: gRPC errors become duplex.common.errors exceptions."""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from duplex.common.errors import DuplexError, Internal, Unavailable, from_rpc_error, from_status
from duplex.history.v1 import history_pb2, history_pb2_grpc
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from duplex.session.v1 import session_pb2, session_pb2_grpc


def _translated(service: str):
    def decorate(method):
        @functools.wraps(method)
        async def call(*args, **kwargs):
            try:
                return await method(*args, **kwargs)
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error, service) from None

        return call

    return decorate


class SessionClient:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self._stub = session_pb2_grpc.SessionServiceStub(channel)
        self._timeout = timeout

    @_translated("session service")
    async def open(
        self, user_id: str, session_id: str = "", conversation_id: str = "", model: str = "",
        system_prompt: str = "", persona: str = "", voice_options: bytes = b"",
    ) -> session_pb2.OpenSessionResponse:
        """voice_options (a serialized duplex.chat.v1.VoiceOptions) only apply to a new session."""
        request = session_pb2.OpenSessionRequest(
            user_id=user_id, session_id=session_id, conversation_id=conversation_id, model=model,
            system_prompt=system_prompt, persona=persona, voice_options=voice_options,
        )
        return await self._stub.OpenSession(request, timeout=self._timeout)

    @_translated("session service")
    async def get(self, user_id: str, session_id: str) -> session_pb2.Session:
        request = session_pb2.GetSessionRequest(user_id=user_id, session_id=session_id)
        return (await self._stub.GetSession(request, timeout=self._timeout)).session

    @_translated("session service")
    async def update(self, user_id: str, session_id: str, voice_options: bytes) -> session_pb2.Session:
        """Replace the session's voice options (empty clears them); returns the session after the update."""
        request = session_pb2.UpdateSessionRequest(user_id=user_id, session_id=session_id, voice_options=voice_options)
        return (await self._stub.UpdateSession(request, timeout=self._timeout)).session

    @_translated("session service")
    async def close(self, user_id: str, session_id: str) -> None:
        request = session_pb2.CloseSessionRequest(user_id=user_id, session_id=session_id)
        await self._stub.CloseSession(request, timeout=self._timeout)

    @_translated("session service")
    async def begin_turn(
        self, user_id: str, session_id: str, turn_id: str, owner: str, uses_audio: bool = False
    ) -> session_pb2.BeginTurnResponse:
        """uses_audio: the turn hears or speaks audio, so the daily audio quota may refuse it."""
        request = session_pb2.BeginTurnRequest(
            user_id=user_id, session_id=session_id, turn_id=turn_id, owner=owner, uses_audio=uses_audio
        )
        return await self._stub.BeginTurn(request, timeout=self._timeout)

    @_translated("session service")
    async def end_turn(
        self, session_id: str, turn_id: str, tokens: int = 0, audio_ms: int = 0, unanswered: bool = False
    ) -> None:
        """unanswered: the turn never answered (a duplicate message, or one not stored); its message is
        given back to the user's quota."""
        request = session_pb2.EndTurnRequest(
            session_id=session_id, turn_id=turn_id, tokens=tokens, audio_ms=audio_ms, unanswered=unanswered
        )
        await self._stub.EndTurn(request, timeout=self._timeout)

    @_translated("session service")
    async def append_events(self, session_id: str, events: Iterable[session_pb2.LogEvent]) -> None:
        request = session_pb2.AppendEventsRequest(session_id=session_id, events=events)
        await self._stub.AppendEvents(request, timeout=self._timeout)

    @_translated("session service")
    async def append_event_batches(
        self, batches: Sequence[tuple[str, Iterable[session_pb2.LogEvent]]]
    ) -> list[DuplexError | None]:
        """Append to several sessions' logs in one call. Per (session_id, events) batch: None when it was
        logged, else the error that refused it (the others are logged regardless)."""
        request = session_pb2.AppendEventBatchesRequest(
            batches=[session_pb2.AppendEventsRequest(session_id=sid, events=events) for sid, events in batches]
        )
        response = await self._stub.AppendEventBatches(request, timeout=self._timeout)
        if len(response.results) != len(batches):
            raise Internal(f"session service answered {len(response.results)} results for {len(batches)} batches")
        return [
            from_status(result.error.code, result.error.message) if result.HasField("error") else None
            for result in response.results
        ]

    @_translated("session service")
    async def request_cancel(
        self, user_id: str, session_id: str, turn_id: str = "", interrupt: bool = False, played_ms: int = 0
    ) -> str:
        """Ask the session's running turn (turn_id, or whichever runs when empty) to stop, on whichever
        replica runs it. Returns the turn asked; empty when none (or not that one) runs."""
        request = session_pb2.RequestCancelRequest(
            user_id=user_id, session_id=session_id, turn_id=turn_id, interrupt=interrupt, played_ms=played_ms
        )
        return (await self._stub.RequestCancel(request, timeout=self._timeout)).turn_id

    async def watch_cancels(self, owner: str) -> AsyncIterator[session_pb2.CancelRequested | None]:
        """None once the watch is in place, then each cancel request for the turns `owner` runs."""
        call = self._stub.WatchCancels(session_pb2.WatchCancelsRequest(owner=owner))
        try:
            async for response in call:
                yield response.cancel if response.HasField("cancel") else None
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "session service") from None
        finally:
            call.cancel()

    async def read_events(
        self, user_id: str, session_id: str, after_seq: int, follow: bool
    ) -> AsyncIterator[session_pb2.LogEvent]:
        request = session_pb2.ReadEventsRequest(
            user_id=user_id, session_id=session_id, after_seq=after_seq, follow=follow
        )
        call = self._stub.ReadEvents(request)
        try:
            async for batch in call:
                for event in batch.events:
                    yield event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "session service") from None
        finally:
            call.cancel()


class HistoryClient:
    def __init__(self, channel: grpc.aio.Channel, timeout: float):
        self._stub = history_pb2_grpc.HistoryServiceStub(channel)
        self._timeout = timeout

    @_translated("history service")
    async def create_conversation(self, user_id: str) -> history_pb2.Conversation:
        request = history_pb2.CreateConversationRequest(user_id=user_id)
        return (await self._stub.CreateConversation(request, timeout=self._timeout)).conversation

    @_translated("history service")
    async def get_conversation(self, user_id: str, conversation_id: str) -> history_pb2.Conversation:
        request = history_pb2.GetConversationRequest(user_id=user_id, conversation_id=conversation_id)
        return (await self._stub.GetConversation(request, timeout=self._timeout)).conversation

    @_translated("history service")
    async def append_message(
        self, request: history_pb2.AppendMessageRequest, timeout: float | None = None
    ) -> history_pb2.AppendMessageResponse:
        return await self._stub.AppendMessage(request, timeout=timeout or self._timeout)

    @_translated("history service")
    async def list_messages(
        self, user_id: str, conversation_id: str, page_token: str = "", page_size: int = 1000,
        newest_first: bool = False,
    ) -> history_pb2.ListMessagesResponse:
        request = history_pb2.ListMessagesRequest(
            user_id=user_id, conversation_id=conversation_id, page_size=page_size, page_token=page_token,
            newest_first=newest_first,
        )
        return await self._stub.ListMessages(request, timeout=self._timeout)

    @_translated("history service")
    async def search_messages(
        self, user_id: str, query: str, page_size: int, page_token: str = ""
    ) -> history_pb2.SearchMessagesResponse:
        request = history_pb2.SearchMessagesRequest(
            user_id=user_id, query=query, page_size=page_size, page_token=page_token
        )
        return await self._stub.SearchMessages(request, timeout=self._timeout)

    @_translated("history service")
    async def list_conversations(
        self, user_id: str, page_size: int, page_token: str
    ) -> history_pb2.ListConversationsResponse:
        request = history_pb2.ListConversationsRequest(user_id=user_id, page_size=page_size, page_token=page_token)
        return await self._stub.ListConversations(request, timeout=self._timeout)

    @_translated("history service")
    async def rename_conversation(self, user_id: str, conversation_id: str, title: str) -> history_pb2.Conversation:
        request = history_pb2.RenameConversationRequest(user_id=user_id, conversation_id=conversation_id, title=title)
        return (await self._stub.RenameConversation(request, timeout=self._timeout)).conversation

    @_translated("history service")
    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        request = history_pb2.DeleteConversationRequest(user_id=user_id, conversation_id=conversation_id)
        await self._stub.DeleteConversation(request, timeout=self._timeout)

    @_translated("history service")
    async def export_conversation(
        self, user_id: str, conversation_id: str, export_format: int
    ) -> history_pb2.ExportConversationResponse:
        request = history_pb2.ExportConversationRequest(
            user_id=user_id, conversation_id=conversation_id, format=export_format
        )
        return await self._stub.ExportConversation(request, timeout=self._timeout)

    @_translated("history service")
    async def get_usage(self, user_id: str, from_day: str, to_day: str) -> list[history_pb2.UsageRecord]:
        request = history_pb2.GetUsageRequest(user_id=user_id, from_day=from_day, to_day=to_day)
        return list((await self._stub.GetUsage(request, timeout=self._timeout)).records)


class LlmClient:
    def __init__(self, channel: grpc.aio.Channel):
        self._stub = llm_pb2_grpc.LlmServiceStub(channel)

    def generate(self, request: llm_pb2.GenerateRequest, timeout: float) -> "Generation":
        """Start the call now, so the model starts answering; read the reply by iterating the result."""
        return Generation(self._stub.Generate(request, timeout=timeout))

    def transcribe(self, timeout: float) -> "SpeechCall":
        """Open a Transcribe call; write its config first, then audio."""
        return SpeechCall(self._stub.Transcribe(timeout=timeout))

    def synthesize(self, timeout: float) -> "SpeechCall":
        """Open a Synthesize call; write its config first, then text."""
        return SpeechCall(self._stub.Synthesize(timeout=timeout))


class Generation:
    """A started Generate call. Iterate it once; an error or `cancel()` cancels the upstream request."""

    def __init__(self, call):
        self._call = call

    async def __aiter__(self) -> AsyncIterator[llm_pb2.GenerateResponse]:
        try:
            async for response in self._call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "llm service") from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()

    def cancelled(self) -> bool:
        return self._call.cancelled()


class SpeechCall:
    """A started bidi speech call (Transcribe or Synthesize): write requests, read responses by iterating it
    once. Errors arrive as duplex errors; `cancel()` (or leaving the iteration) closes the provider's upstream."""

    def __init__(self, call):
        self._call = call

    async def write(self, request) -> None:
        if self._call.done():  # grpc raises CancelledError for a write to a cancelled call: say it plainly
            raise Unavailable("the speech call ended")
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The call ended (a write racing the server's status can see a bare INTERNAL from grpc core
            # instead of it): the reader reports the real status.
            raise Unavailable("the speech call ended") from None

    async def done_writing(self) -> None:
        if self._call.done():
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()

    async def __aiter__(self):
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "llm service") from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()
