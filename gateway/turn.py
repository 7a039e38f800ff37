"""A turn: one user message and the assistant's answer, from message_accepted to exactly one of
turn_completed / turn_cancelled / error.

A turn runs in its own task, owned by TurnManager rather than by the client's stream, so a dropped
connection does not stop it; only an explicit cancel (or the gateway stopping) does.
"""

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import DuplexError, FailedPrecondition, Internal, InvalidArgument, Unavailable
from duplex.history.v1 import history_pb2
from duplex.llm.v1 import llm_pb2
from gateway.clients import HistoryClient, LlmClient, SessionClient
from gateway.hub import HubRegistry, SessionHub, is_terminal
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

MAX_CLIENT_MESSAGE_ID_CHARS = 128
_LLM_ROLES = {history_pb2.ROLE_USER: llm_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT: llm_pb2.ROLE_ASSISTANT}
_FINISH_REASONS = {
    llm_pb2.FINISH_REASON_STOP: chat_pb2.FINISH_REASON_STOP,
    llm_pb2.FINISH_REASON_LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    llm_pb2.FINISH_REASON_CONTENT_FILTER: chat_pb2.FINISH_REASON_CONTENT_FILTER,
}


@dataclass(frozen=True)
class SessionContext:
    """What a turn needs to know about its session."""

    session_id: str
    user_id: str
    conversation_id: str
    model: str
    system_prompt: str


@dataclass(frozen=True)
class Services:
    sessions: SessionClient
    history: HistoryClient
    llm: LlmClient


def error_event(error: DuplexError, turn_id: str = "") -> chat_pb2.ChatEvent:
    chat_error = chat_pb2.ChatError(code=error.code.value[0], message=error.message, retryable=error.retryable)
    if error.retry_after:
        chat_error.retry_after.FromNanoseconds(int(error.retry_after * 1e9))
    return chat_pb2.ChatEvent(turn_id=turn_id, error=chat_error)


class Turn:
    def __init__(
        self, hub: SessionHub, session: SessionContext, message: chat_pb2.UserMessage, services: Services,
        settings: GatewaySettings,
    ):
        self.id = uuid.uuid4().hex
        self.client_message_id = message.client_message_id
        self.hub = hub
        self.session = session
        self._services = services
        self._settings = settings
        self.user_message_id = ""
        self._answered = False
        self._finished = asyncio.Event()
        self._producer: asyncio.Task | None = None
        self._cancel_requested = False
        self._text: list[str] = []
        self._model = session.model
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._started_at = time.monotonic()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    def cancel(self) -> None:
        """Stop the answer; closing the llm stream closes the provider's upstream request."""
        self._cancel_requested = True
        if self._producer is not None:
            self._producer.cancel()

    @property
    def answered(self) -> bool:
        """True once the turn's terminal event is out; only its bookkeeping remains."""
        return self._answered

    async def wait_finished(self) -> None:
        await self._finished.wait()

    async def run(self) -> None:
        try:
            await self._answer()
        finally:
            try:
                await self._log_and_end()
            finally:
                self.hub.turn = None
                self.hub.wake()
                self._finished.set()

    async def _answer(self) -> None:
        if self._cancel_requested:
            return await self._end_cancelled()
        self._producer = asyncio.create_task(self._produce(), name=f"turn-{self.id}")
        try:
            finish_reason = await self._producer
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the gateway is stopping, not the user
                await self._end_interrupted()
                raise
            await self._end_cancelled()
        except DuplexError as error:
            await self._end_failed(error)
        except Exception:
            log.exception("turn %s failed", self.id)
            await self._end_failed(Internal("internal error"))
        else:
            await self._end_completed(finish_reason)

    async def _produce(self) -> int:
        request = llm_pb2.GenerateRequest(model=self.session.model, messages=await self._context_messages())
        stream = self._services.llm.generate(request, timeout=self._settings.turn_timeout_seconds)
        async for response in stream:
            kind = response.WhichOneof("kind")
            if kind == "started":
                self._on_started(response.started)
            elif kind == "chunk":
                self._on_chunk(response.chunk)
            elif kind == "finished":
                self._prompt_tokens = response.finished.prompt_tokens
                self._completion_tokens = response.finished.completion_tokens
                return response.finished.finish_reason
        raise Unavailable("the model's stream ended before it finished")

    async def _context_messages(self) -> list[llm_pb2.Message]:
        recent: deque[history_pb2.Message] = deque(maxlen=self._settings.context_messages)
        page_token = ""
        while True:
            page = await self._services.history.list_messages(
                self.session.user_id, self.session.conversation_id, page_token
            )
            recent.extend(page.messages)
            page_token = page.next_page_token
            if not page_token:
                break
        system_prompt = self.session.system_prompt or self._settings.default_system_prompt
        messages = [llm_pb2.Message(role=llm_pb2.ROLE_SYSTEM, content=system_prompt)]
        messages += [
            llm_pb2.Message(role=_LLM_ROLES[m.role], content=m.content)
            for m in recent
            if m.role in _LLM_ROLES and m.content
        ]
        return messages

    def _on_started(self, started: llm_pb2.GenerateStarted) -> None:
        self._model = started.model
        self._prompt_tokens = started.prompt_tokens
        turn_started = chat_pb2.TurnStarted(user_message_id=self.user_message_id, model=started.model)
        self._publish(chat_pb2.ChatEvent(turn_started=turn_started))

    def _on_chunk(self, chunk: llm_pb2.TextChunk) -> None:
        now = time.monotonic()
        self._first_token_at = self._first_token_at or now
        self._last_token_at = now
        self._text.append(chunk.text)
        self._completion_tokens += chunk.token_count
        self._publish(chat_pb2.ChatEvent(delta=chat_pb2.TextDelta(text=chunk.text)))

    def _publish(self, event: chat_pb2.ChatEvent) -> None:
        event.turn_id = self.id
        self.hub.publish(event)
        self._answered = is_terminal(event)

    def _usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens)

    async def _store_reply(self, status: int) -> str:
        """Store the answer (whole or partial) once per turn; returns its message id."""
        request = history_pb2.AppendMessageRequest(
            user_id=self.session.user_id, conversation_id=self.session.conversation_id,
            role=history_pb2.ROLE_ASSISTANT, content="".join(self._text), status=status,
            client_message_id=f"turn:{self.id}", model=self._model,
            prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens,
        )
        return (await self._services.history.append_message(request)).message.message_id

    async def _store_partial(self, status: int) -> str:
        if not self._text:
            return ""
        try:
            return await self._store_reply(status)
        except DuplexError as error:
            log.error("turn %s: partial answer not stored: %s", self.id, error.message)
            return ""

    async def _end_completed(self, finish_reason: int) -> None:
        try:
            message_id = await self._store_reply(history_pb2.MESSAGE_STATUS_COMPLETE)
        except DuplexError as error:
            log.error("turn %s: answer not stored: %s", self.id, error.message)
            self._publish(error_event(Unavailable("the answer could not be saved; send the message again")))
            return
        completed = chat_pb2.TurnCompleted(
            finish_reason=_FINISH_REASONS.get(finish_reason, chat_pb2.FINISH_REASON_STOP),
            usage=self._usage(), assistant_message_id=message_id, tokens_per_second=self._tokens_per_second(),
        )
        if self._first_token_at is not None:
            completed.time_to_first_token.CopyFrom(_duration(self._first_token_at - self._started_at))
        self._publish(chat_pb2.ChatEvent(turn_completed=completed))

    def _tokens_per_second(self) -> float:
        if self._first_token_at is None or self._last_token_at == self._first_token_at:
            return 0.0
        return self._completion_tokens / (self._last_token_at - self._first_token_at)

    async def _end_cancelled(self) -> None:
        message_id = await self._store_partial(history_pb2.MESSAGE_STATUS_CANCELLED)
        cancelled = chat_pb2.TurnCancelled(usage=self._usage(), assistant_message_id=message_id)
        self._publish(chat_pb2.ChatEvent(turn_cancelled=cancelled))

    async def _end_failed(self, error: DuplexError) -> None:
        await self._store_partial(history_pb2.MESSAGE_STATUS_ERROR)
        self._publish(error_event(error))

    async def _end_interrupted(self) -> None:
        await self._store_partial(history_pb2.MESSAGE_STATUS_INTERRUPTED)
        self._publish(error_event(Unavailable("the server stopped during this answer; send the message again")))

    async def _log_and_end(self) -> None:
        """Hand the turn's last events to the log, then tell the session no turn runs any more."""
        try:
            await self.hub.flush()
        except DuplexError as error:
            log.warning("turn %s: events not logged yet (%s); the flusher retries", self.id, error.message)
        try:
            await self._services.sessions.end_turn(self.session.session_id, self.id)
        except DuplexError as error:
            log.warning("turn %s: could not mark the turn ended: %s", self.id, error.message)


def _accepted(
    session: SessionContext, message: chat_pb2.UserMessage, message_id: str, duplicate: bool
) -> chat_pb2.ChatEvent:
    accepted = chat_pb2.MessageAccepted(
        message_id=message_id, client_message_id=message.client_message_id, duplicate=duplicate
    )
    return chat_pb2.ChatEvent(session_id=session.session_id, message_accepted=accepted)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class TurnManager:
    """Starts turns and owns their tasks; on shutdown it interrupts and awaits them."""

    def __init__(self, services: Services, hubs: HubRegistry, settings: GatewaySettings):
        self._services = services
        self._hubs = hubs
        self._settings = settings
        self._tasks: set[asyncio.Task] = set()

    async def start(
        self, hub: SessionHub, session: SessionContext, message: chat_pb2.UserMessage
    ) -> tuple[Turn | None, chat_pb2.ChatEvent]:
        """Store the message and start answering it. Returns the turn and its logged message_accepted
        event, or (None, an ephemeral message_accepted) when the message is a duplicate."""
        self._validate(message)
        running = hub.turn
        if running is not None and running.answered:
            # The client saw the previous turn end; it is only logging its last events. Wait for that.
            await asyncio.wait_for(running.wait_finished(), self._settings.rpc_timeout_seconds)
            running = hub.turn
        if running is not None and message.client_message_id == running.client_message_id != "":
            # A resend of the message being answered (say, after a reconnect): acknowledge, don't answer twice.
            return None, _accepted(session, message, running.user_message_id, duplicate=True)
        if running is not None:
            raise FailedPrecondition("a turn is already running in this session; cancel it or wait")
        turn = Turn(hub, session, message, self._services, self._settings)
        hub.turn = turn  # reserved before the first await, so concurrent messages are refused
        started = False
        try:
            last_seq = await self._services.sessions.begin_turn(session.user_id, session.session_id, turn.id)
            try:
                stored = await self._services.history.append_message(self._user_message(session, message))
            except BaseException:
                await self._end_quietly(session, turn)
                raise
            if stored.duplicate:  # stored once and answered once already
                await self._end_quietly(session, turn)
                return None, _accepted(session, message, stored.message.message_id, duplicate=True)
            turn.user_message_id = stored.message.message_id
            started = True
        finally:
            if not started:
                hub.turn = None
                hub.wake()
        hub.restart_at(last_seq)
        accepted = _accepted(session, message, turn.user_message_id, duplicate=False)
        accepted.turn_id = turn.id
        event = hub.publish(accepted)
        self._hubs.acquire(hub.session_id, hub.user_id, hub.last_seq)  # the turn's own reference
        task = asyncio.create_task(self._run(turn), name=f"turn-run-{turn.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return turn, event

    @staticmethod
    def _user_message(session: SessionContext, message: chat_pb2.UserMessage) -> history_pb2.AppendMessageRequest:
        return history_pb2.AppendMessageRequest(
            user_id=session.user_id, conversation_id=session.conversation_id, role=history_pb2.ROLE_USER,
            content=message.text, status=history_pb2.MESSAGE_STATUS_COMPLETE,
            client_message_id=message.client_message_id,
        )

    async def _end_quietly(self, session: SessionContext, turn: Turn) -> None:
        try:
            await self._services.sessions.end_turn(session.session_id, turn.id)
        except DuplexError as error:
            log.warning("turn %s: could not release the session: %s", turn.id, error.message)

    def _validate(self, message: chat_pb2.UserMessage) -> None:
        if not message.text.strip():
            raise InvalidArgument("message text is empty")
        if len(message.text) > self._settings.max_message_chars:
            raise InvalidArgument(f"message text is longer than {self._settings.max_message_chars} characters")
        if len(message.client_message_id) > MAX_CLIENT_MESSAGE_ID_CHARS:
            raise InvalidArgument(f"client_message_id is longer than {MAX_CLIENT_MESSAGE_ID_CHARS} characters")

    async def _run(self, turn: Turn) -> None:
        try:
            await turn.run()
        finally:
            await self._hubs.release(turn.hub)

    async def close(self) -> None:
        """Interrupt every running turn (each ends with a retryable error event) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
