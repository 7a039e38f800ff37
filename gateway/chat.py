"""duplex.chat.v1.ChatService: the bidi Chat stream, SendMessage, CancelTurn and ResumeStream."""

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.common.errors import DuplexError, FailedPrecondition, InvalidArgument, OutOfRange, Unavailable
from duplex.session.v1 import session_pb2
from gateway import personas
from gateway.auth import Authenticator
from gateway.cancels import stop_turn
from gateway.hub import UNLOGGED_LIMIT, HubRegistry, LogUnreachable, SessionHub, SessionLost, error_event, is_terminal
from gateway.recovery import end_abandoned_turn
from gateway.settings import GatewaySettings
from gateway.turn import Services, SessionContext, TurnManager
from gateway.voice import VoiceInput, VoiceInputs, parse_voice_options, validate_voice_options

log = logging.getLogger(__name__)

MAX_ID_CHARS = 128
_END = object()  # closes a connection's outbox


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self, services: Services, hubs: HubRegistry, turns: TurnManager, identity: Authenticator,
        settings: GatewaySettings, voice_inputs: VoiceInputs,
    ):
        self.services = services
        self.hubs = hubs
        self.turns = turns
        self.voice_inputs = voice_inputs
        self._identity = identity
        self._settings = settings
        self.connections: set[ChatConnection] = set()

    async def Chat(self, request_iterator, context):
        connection = ChatConnection(self, self._identity.user_id(context))
        await connection.run(request_iterator, context.write)

    async def SendMessage(self, request: chat_pb2.SendMessageRequest, context):
        user_id = self._identity.user_id(context)
        session, last_seq, opened = await self.open_session(
            user_id, request.session_id, request.conversation_id, request.model, request.system_prompt,
            request.persona, request.voice,
        )
        yield chat_pb2.SendMessageResponse(event=opened)
        async with self.hubs.attached(session.session_id, user_id, last_seq) as hub:
            turn, accepted = await self.turns.start(hub, session, request.message)
            if turn is None:
                yield chat_pb2.SendMessageResponse(event=accepted)
                return
            async with contextlib.aclosing(hub.follow(accepted.seq - 1)) as events:
                async for event in events:
                    yield chat_pb2.SendMessageResponse(event=event)
                    if event.turn_id == turn.id and is_terminal(event):
                        return

    async def drain(self) -> None:
        """For a rolling update: let running turns finish, then end every Chat stream with UNAVAILABLE
        after an event that tells its client where to resume (on another replica)."""
        await self.turns.drain()
        await asyncio.gather(*(connection.say_goodbye() for connection in list(self.connections)))

    async def CancelTurn(self, request: chat_pb2.CancelTurnRequest, context) -> chat_pb2.CancelTurnResponse:
        user_id = self._identity.user_id(context)
        _validate_id("session_id", request.session_id, required=True)
        await self.services.sessions.get(user_id, request.session_id)  # NOT_FOUND unless the user's
        cancelled = await self.stop_turn(user_id, request.session_id, request.turn_id)
        return chat_pb2.CancelTurnResponse(cancelled=cancelled)

    async def CloseSession(self, request: chat_pb2.CloseSessionRequest, context) -> chat_pb2.CloseSessionResponse:
        user_id = self._identity.user_id(context)
        _validate_id("session_id", request.session_id, required=True)
        session = await self.services.sessions.get(user_id, request.session_id)  # NOT_FOUND unless the user's
        await self.voice_inputs.discard(request.session_id, Unavailable("the session was closed"))
        hub = self.hubs.get(request.session_id)
        turn = hub.turn if hub is not None else None
        # The cancelled turn still ends, with usage, before the log goes.
        if await self.stop_turn(user_id, request.session_id):
            if turn is not None:
                await turn.wait_finished()
            else:
                await self._until_no_turn_runs(user_id, request.session_id, session.last_seq)
        await self.services.sessions.close(user_id, request.session_id)
        return chat_pb2.CloseSessionResponse()

    async def stop_turn(
        self, user_id: str, session_id: str, turn_id: str = "", interrupt: bool = False, played_ms: int = 0
    ) -> bool:
        """Stop the session's running turn on whichever replica runs it (gateway.cancels)."""
        return await stop_turn(self.services.sessions, self.hubs, user_id, session_id, turn_id, interrupt, played_ms)

    async def _until_no_turn_runs(self, user_id: str, session_id: str, after_seq: int) -> None:
        """Wait (bounded) for a turn stopped on another replica to end: following the log ends once no
        turn runs and everything logged was read."""
        events = self.services.sessions.read_events(user_id, session_id, after_seq, follow=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.rpc_timeout_seconds), contextlib.aclosing(events):
                async for _ in events:
                    pass

    async def SendAudio(self, request: chat_pb2.SendAudioRequest, context) -> chat_pb2.SendAudioResponse:
        user_id = self._identity.user_id(context)
        _validate_id("session_id", request.session_id, required=True)
        _validate_id("client_message_id", request.client_message_id)
        session = self.session_context(await self.services.sessions.get(user_id, request.session_id), user_id)
        async with self.hubs.attached(session.session_id, user_id, session.last_seq) as hub:
            voice_input = self.voice_input(hub, session)
            buffered = await voice_input.add(request.data, request.client_message_id)
            utterance_id = voice_input.utterance_id
            if request.commit:
                utterance_id, buffered = await voice_input.commit(request.client_message_id), 0
        return chat_pb2.SendAudioResponse(buffered_bytes=buffered, client_message_id=utterance_id)

    async def UpdateSession(self, request: chat_pb2.UpdateSessionRequest, context) -> chat_pb2.UpdateSessionResponse:
        user_id = self._identity.user_id(context)
        _validate_id("session_id", request.session_id, required=True)
        voice = await self.update_voice(user_id, request.session_id, request.voice)
        return chat_pb2.UpdateSessionResponse(voice=voice)

    async def update_voice(self, user_id: str, session_id: str, voice: chat_pb2.VoiceOptions) -> chat_pb2.VoiceOptions:
        validate_voice_options(voice)
        updated = await self.services.sessions.update(user_id, session_id, voice.SerializeToString())
        await self.voice_inputs.discard(session_id, Unavailable("the session's voice options changed; speak again"))
        return parse_voice_options(updated.voice_options)

    def voice_input(self, hub: SessionHub, session: SessionContext) -> VoiceInput:
        """The session's voice input on this replica, with the session's voice options."""
        begin_turn = partial(self.turns.begin_voice_turn, hub, session)
        return self.voice_inputs.open(hub, session.voice, self.services.llm, self._settings, begin_turn)

    @staticmethod
    def session_context(session: session_pb2.Session, user_id: str, new_conversation: bool = False) -> SessionContext:
        return SessionContext(
            session.session_id, user_id, session.conversation_id, session.model, session.system_prompt,
            session.persona, session.active_turn_id, new_conversation=new_conversation,
            voice=parse_voice_options(session.voice_options), last_seq=session.last_seq,
        )

    async def ResumeStream(self, request: chat_pb2.ResumeStreamRequest, context):
        user_id = self._identity.user_id(context)
        _validate_id("session_id", request.session_id, required=True)
        session = await self.services.sessions.get(user_id, request.session_id)
        # A client may be up to UNLOGGED_LIMIT events ahead of the log (shown by a replica that then died).
        if request.after_seq > session.last_seq + UNLOGGED_LIMIT and self.hubs.get(session.session_id) is None:
            raise OutOfRange(f"after_seq {request.after_seq} is ahead of the session's last seq {session.last_seq}")
        async for event in self._events_after(user_id, session, request.after_seq):
            yield chat_pb2.ResumeStreamResponse(event=event)

    async def _events_after(
        self, user_id: str, session: session_pb2.Session, after_seq: int
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Missed events, then the running turn's, from memory when the session is active here."""
        if self.hubs.get(session.session_id) is not None:
            async with self.hubs.attached(session.session_id, user_id, session.last_seq) as hub:
                async for event in hub.follow(after_seq):
                    yield event
            return
        async for event in self.follow_remote(user_id, session.session_id, after_seq, session.active_turn_id):
            yield event

    async def follow_remote(
        self, user_id: str, session_id: str, after_seq: int, running_turn_id: str
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        """The session's log from the session service, following a turn that runs on another replica
        until it ends. A turn that stopped without an end (its replica died) is ended here."""
        turn_id, ended = running_turn_id, False
        async for logged in self.services.sessions.read_events(user_id, session_id, after_seq, follow=True):
            event = chat_pb2.ChatEvent.FromString(logged.payload)
            if event.turn_id:
                turn_id, ended = event.turn_id, is_terminal(event)
            yield event
        if turn_id and not ended:
            recovered = await self._end_if_abandoned(user_id, session_id, turn_id)
            if recovered is not None:
                yield recovered

    async def _end_if_abandoned(self, user_id: str, session_id: str, turn_id: str) -> chat_pb2.ChatEvent | None:
        sessions = self.services.sessions
        session = await sessions.get(user_id, session_id)
        if session.active_turn_id:
            return None  # a live turn: this one still running after all, or a newer one (which ends it)
        try:
            begun = await sessions.begin_turn(user_id, session_id, turn_id, self.turns.owner)  # its lease ran out
        except DuplexError:
            return None  # ended meanwhile, or another turn started
        try:
            async with self.hubs.attached(session_id, user_id, begun.last_seq) as hub:
                hub.restart_at(begun.last_seq)
                return await end_abandoned_turn(sessions, self.services.history, hub, session.conversation_id, turn_id)
        finally:
            await _quietly(sessions.end_turn(session_id, turn_id))

    async def open_session(
        self, user_id: str, session_id: str, conversation_id: str, model: str, system_prompt: str, persona: str,
        voice: chat_pb2.VoiceOptions | None = None,
    ) -> tuple[SessionContext, int, chat_pb2.ChatEvent]:
        """Create or re-attach to a session; returns it, its last seq and the session_opened event."""
        personas.validate_persona(persona)
        voice = voice or chat_pb2.VoiceOptions()
        validate_voice_options(voice)
        _validate_id("session_id", session_id)
        _validate_id("conversation_id", conversation_id)
        _validate_id("model", model)
        if len(system_prompt) > self._settings.max_message_chars:
            raise InvalidArgument(f"system_prompt is longer than {self._settings.max_message_chars} characters")
        sessions, history = self.services.sessions, self.services.history
        created = False
        if not session_id:
            if conversation_id:
                await history.get_conversation(user_id, conversation_id)  # NOT_FOUND unless the user's
            else:
                conversation_id = (await history.create_conversation(user_id)).conversation_id
                created = True
        opened = await sessions.open(
            user_id, session_id, conversation_id, model, system_prompt, persona,
            voice_options=voice.SerializeToString(),
        )
        s = opened.session
        context = self.session_context(s, user_id, new_conversation=created)
        event = chat_pb2.ChatEvent(
            session_id=s.session_id,
            session_opened=chat_pb2.SessionOpened(
                session_id=s.session_id, conversation_id=s.conversation_id, resumed=opened.resumed,
                model=s.model, persona=s.persona, last_seq=s.last_seq, voice=context.voice,
            ),
        )
        event.time.GetCurrentTime()
        return context, s.last_seq, event


async def _quietly(call) -> None:
    try:
        await call
    except DuplexError as error:
        log.warning("%s", error.message)


def _checked_id(client_message_id: str) -> str:
    _validate_id("client_message_id", client_message_id)
    return client_message_id


def _validate_id(name: str, value: str, required: bool = False) -> None:
    if required and not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{name} is longer than {MAX_ID_CHARS} characters")


class ChatConnection:
    """One Chat stream. A reader task handles requests; a follower task relays the session's logged
    events; both feed one bounded outbox that this stream writes, so the client sees one ordered stream."""

    def __init__(self, servicer: ChatServicer, user_id: str):
        self._servicer = servicer
        self._user_id = user_id
        self._outbox: asyncio.Queue = asyncio.Queue(servicer._settings.connection_outbox_events)
        self._session: SessionContext | None = None
        self._hub: SessionHub | None = None
        self._follower: asyncio.Task | None = None
        self._half_closed = False

    async def run(
        self, requests: AsyncIterator[chat_pb2.ChatRequest], write: Callable[[chat_pb2.ChatResponse], Awaitable[None]]
    ) -> None:
        """Serve one connection: `requests` are what the client sends (native gRPC or WebSocket frames),
        `write` sends one response to it."""
        reader = asyncio.create_task(self._read(requests), name="chat-reader")
        self._servicer.connections.add(self)
        try:
            while (item := await self._outbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                await write(chat_pb2.ChatResponse(event=item))
        finally:
            # A disconnect lands here too: stop reading and relaying; running turns go on.
            tasks = [task for task in (reader, self._follower) if task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._servicer.connections.discard(self)
            if self._hub is not None:
                await self._servicer.hubs.release(self._hub)

    async def _read(self, requests) -> None:
        try:
            async for request in requests:
                await self._handle(request)
            # The client half-closed: it sends no more, but still gets the running turn to its end.
            self._half_closed = True
            if self._follower is not None:
                self._hub.wake()
                await self._follower
            await self._outbox.put(_END)
        except Exception as error:
            await self._outbox.put(error)

    async def _handle(self, request: chat_pb2.ChatRequest) -> None:
        kind = request.WhichOneof("kind")
        try:
            if kind == "open":
                await self._open(request.open)
            elif kind == "message":
                await self._send(request.message)
            elif kind == "cancel":
                await self._stop(request.cancel.turn_id)
            elif kind == "ping":
                await self._emit(chat_pb2.ChatEvent(pong=chat_pb2.Pong(nonce=request.ping.nonce)))
            elif kind == "audio":
                await self._voice_input().add(request.audio.data, _checked_id(request.audio.client_message_id))
            elif kind == "commit":
                await self._voice_input().commit(_checked_id(request.commit.client_message_id))
            elif kind == "interrupt":
                await self._stop(request.interrupt.turn_id, interrupt=True, played_ms=request.interrupt.played_ms)
            elif kind == "update_session":
                await self._update_session(request.update_session)
            else:
                raise InvalidArgument(
                    "empty request: set one of open, message, cancel, ping, audio, commit, interrupt or update_session"
                )
        except DuplexError as error:
            await self._emit(error_event(error))

    async def _stop(self, turn_id: str, interrupt: bool = False, played_ms: int = 0) -> None:
        hub = self._require_hub()
        await self._servicer.stop_turn(self._user_id, hub.session_id, turn_id, interrupt, played_ms)

    def _voice_input(self) -> VoiceInput:
        return self._servicer.voice_input(self._require_hub(), self._session)

    async def _update_session(self, update: chat_pb2.SessionUpdate) -> None:
        self._require_hub()
        voice = await self._servicer.update_voice(self._user_id, self._session.session_id, update.voice)
        self._session = dataclasses.replace(self._session, voice=voice)
        await self._emit(chat_pb2.ChatEvent(session_updated=chat_pb2.SessionUpdated(voice=voice)))

    async def _open(self, open_request: chat_pb2.OpenSession) -> None:
        if self._session is not None:
            raise FailedPrecondition("a session is already open on this stream")
        session, last_seq, opened = await self._servicer.open_session(
            self._user_id, open_request.session_id, open_request.conversation_id, open_request.model,
            open_request.system_prompt, open_request.persona, open_request.voice,
        )
        self._session = session
        self._hub = self._servicer.hubs.acquire(session.session_id, self._user_id, last_seq)
        await self._emit(opened)
        after_seq = self._hub.last_seq
        if open_request.HasField("resume_after_seq"):
            if open_request.resume_after_seq > after_seq + UNLOGGED_LIMIT:
                await self._emit(error_event(OutOfRange(
                    f"resume_after_seq {open_request.resume_after_seq} is ahead of the session's last seq {after_seq}"
                )))
            else:
                after_seq = open_request.resume_after_seq
        # A turn running on another replica is followed through the session service until it ends.
        remote_turn = session.running_turn_id if self._hub.turn is None else ""
        self._follower = asyncio.create_task(self._follow(after_seq, remote_turn), name="chat-follower")

    async def _send(self, message: chat_pb2.UserMessage) -> None:
        turn, accepted = await self._servicer.turns.start(self._require_hub(), self._session, message)
        if turn is None:
            await self._emit(accepted)  # a duplicate: acknowledged, not answered again
        # A new turn's events reach this client through the follower, like every other logged event.

    async def _follow(self, after_seq: int, remote_turn_id: str = "") -> None:
        if remote_turn_id:
            after_seq = await self._follow_remote(after_seq, remote_turn_id)
        while True:
            try:
                async for event in self._hub.follow(after_seq, stop_when_idle=lambda: self._half_closed):
                    after_seq = event.seq
                    await self._outbox.put(event)
                return
            except (LogUnreachable, SessionLost) as error:
                # Say why, then end the stream with that status: its client resumes (or reopens) later.
                await self._emit(error_event(error))
                await self._outbox.put(error)
                return
            except DuplexError as error:
                # Older events are gone or unreachable: say so, and go on with the live ones.
                await self._emit(error_event(error))
                after_seq = self._hub.last_seq

    async def _follow_remote(self, after_seq: int, turn_id: str) -> int:
        try:
            async for event in self._servicer.follow_remote(self._user_id, self._hub.session_id, after_seq, turn_id):
                after_seq = max(after_seq, event.seq)
                await self._outbox.put(event)
        except DuplexError as error:
            await self._emit(error_event(error))
        if after_seq > self._hub.last_seq:
            self._hub.restart_at(after_seq)  # those events were logged elsewhere; number new ones after them
        return after_seq

    async def say_goodbye(self) -> None:
        last_seq = self._hub.last_seq if self._hub is not None else 0
        leaving = Unavailable(f"this server is shutting down; reconnect and resume after seq {last_seq}")
        await self._emit(error_event(leaving))
        await self._outbox.put(leaving)  # ends the stream with UNAVAILABLE, so clients retry elsewhere

    async def reject(self, error: DuplexError) -> None:
        """Tell this client that one of its requests was refused before it could be read (e.g. a WebSocket
        frame that does not parse); the stream goes on."""
        await self._emit(error_event(error))

    def _require_hub(self) -> SessionHub:
        if self._hub is None:
            raise FailedPrecondition("open a session first")
        return self._hub

    async def _emit(self, event: chat_pb2.ChatEvent) -> None:
        """Queue an ephemeral event (seq 0) for this client only."""
        if self._session is not None:
            event.session_id = self._session.session_id
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        await self._outbox.put(event)
