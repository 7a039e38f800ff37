"""A turn: one user message and the assistant's answer, from message_accepted to exactly one of
turn_completed / turn_cancelled / error, with tool rounds in between.

A turn runs in its own task, owned by TurnManager rather than by the client's stream, so a dropped
connection does not stop it; only an explicit cancel (or the gateway stopping) does.

Its life, and who changes what (the session's running turn and conversation belong to its SessionHub,
changed only through take_turn / release_turn / keep_context; its seq cursor and log lease too):
- starts: TurnManager.start takes the hub's turn slot, begins the turn in the session service (quota,
  lease, taking over a turn whose gateway died: gateway.recovery), stores the user message, publishes
  message_accepted and launches Turn.run;
- streams: Turn._produce calls the model (and tools, and the speaker), publishing each event to the hub,
  which numbers it, hands it to followers and batches it into the session log (renewing the lease);
- is cancelled: Turn.stop (a client on this replica, or gateway.cancels for one on another), interrupt
  (barge-in) or fail (speech failed, the session's log is gone) cancel the producer; _answer ends it;
- ends: exactly one terminal event, the answer stored once (or deferred: gateway.deferred_writes), then
  _log_and_end logs the last events and tells the session service, and the hub's slot is released.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from google.protobuf.duration_pb2 import Duration

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DuplexError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
)
from duplex.history.v1 import history_pb2
from duplex.llm.v1 import llm_pb2
from duplex.session.v1 import session_pb2
from gateway import personas
from gateway.clients import Generation, HistoryClient, LlmClient, SessionClient
from gateway.context import ConversationContext, tool_calls_json
from gateway.deferred_writes import DeferredWrites
from gateway.hub import HubRegistry, SessionHub, error_event, is_terminal
from gateway.recovery import end_abandoned_turn
from gateway.settings import GatewaySettings
from gateway.tools import ToolContext, ToolRegistry
from gateway.voice import Speaker, Utterance

log = logging.getLogger(__name__)

MAX_CLIENT_MESSAGE_ID_CHARS = 128
# A message refused because another replica runs a turn is looked for in history this long, in case that
# turn answers this very message (sent through two replicas at once) and is about to store it.
SAME_MESSAGE_ELSEWHERE_WAIT_SECONDS = 0.5
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
    persona: str = ""
    # The turn running when the session was opened (on any replica); "" when none.
    running_turn_id: str = ""
    # True when the conversation was created with the session, so it is known to be empty.
    new_conversation: bool = False
    voice: chat_pb2.VoiceOptions = field(default_factory=chat_pb2.VoiceOptions)
    last_seq: int = 0  # the session's last seq when this context was read


@dataclass(frozen=True)
class Services:
    sessions: SessionClient
    history: HistoryClient
    llm: LlmClient
    tools: ToolRegistry
    deferred_writes: DeferredWrites  # answers history could not take as their turn ended


@dataclass
class Round:
    """One call to the model: its text, the tools it asked for and its token counts."""

    text: str = ""
    tool_calls: tuple[llm_pb2.ToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: int = llm_pb2.FINISH_REASON_UNSPECIFIED


class Turn:
    def __init__(
        self, hub: SessionHub, session: SessionContext, message: chat_pb2.UserMessage, services: Services,
        settings: GatewaySettings, utterance: Utterance | None = None,
    ):
        self.id = uuid.uuid4().hex
        # A voice turn begins before its message exists: it hears the utterance first.
        self.utterance = utterance
        self.client_message_id = message.client_message_id
        self._user_text = message.text
        self._first_turn = False
        self.user_message_id = ""
        self.user_message_stored = history_pb2.AppendMessageResponse()
        self._message_settled = asyncio.Event()  # the user message is stored, or never will be by this turn
        self.hub = hub
        self.session = session
        self._services = services
        self._settings = settings
        self._answered = False
        self._announced = False
        self._finished = asyncio.Event()
        self._producer: asyncio.Task | None = None
        # The model's answer, asked for before the user's message was stored, and the messages it was asked with.
        self._early: tuple[list[llm_pb2.Message], Generation] | None = None
        self._cancel_requested = False
        self._model = session.model
        self._round = Round()
        self._prompt_tokens = 0  # of finished rounds
        self._completion_tokens = 0
        self._started_at = time.monotonic()
        self._deadline = self._started_at + settings.turn_timeout_seconds
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._speaker: Speaker | None = None
        self._failure: DuplexError | None = None  # why the answer must end now (see fail())
        self._saved_later = False  # history did not take the answer as the turn ended; it is written later
        self._interrupted_at_ms: int | None = None  # played_ms of an interrupt
        self._spoken_before_round = 0  # answer text of finished rounds (the speaker's text offsets count it)

    @property
    def uses_audio(self) -> bool:
        return self.utterance is not None or self.session.voice.speak_answers

    @property
    def answered(self) -> bool:
        """True once the turn's terminal event is out; only its bookkeeping remains."""
        return self._answered

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def cancel(self) -> None:
        """Stop the answer; closing the llm stream closes the provider's upstream request."""
        self._cancel_requested = True
        if self._speaker is not None:
            self._speaker.stop()  # no audio event follows, whatever the producer is doing
        if self._producer is not None:
            self._producer.cancel()

    def interrupt(self, played_ms: int | None) -> bool:
        """Barge-in: stop now and keep only what was heard by `played_ms` (None: the server's estimate)."""
        if self._answered:
            return False
        if played_ms is None:
            played_ms = self._speaker.played_ms() if self._speaker is not None else 0
        self._interrupted_at_ms = played_ms
        self.cancel()
        return True

    def stop(self, interrupt: bool = False, played_ms: int | None = None) -> bool:
        """A stop asked by a client, on this replica or another (gateway.cancels): cancel, or for a barge-in
        interrupt. True while the turn is still answering; asking again changes nothing."""
        if self._answered:
            return False
        if not self._cancel_requested:
            if interrupt:
                self.interrupt(played_ms)
            else:
                self.cancel()
        return True

    def publish_voice(self, event: chat_pb2.ChatEvent) -> None:
        """An event of the utterance this turn hears (speech started / stopped, transcripts)."""
        if not self._answered:
            self._publish(event)

    def fail(self, error: DuplexError) -> None:
        """End the answer now with `error`: its speech failed, or the session's log cannot take it."""
        if self._answered or self._failure is not None:
            return
        self._failure = error
        if self._producer is not None:
            self._producer.cancel()

    def ask_early(self) -> None:
        """Start the model on the context this turn will most likely have, while the user's message is
        being stored. `_produce` uses that answer only if the stored conversation turns out the same."""
        if self.hub.context is None:
            return
        user_message = history_pb2.Message(role=history_pb2.ROLE_USER, content=self._user_text)
        messages = self._prompt(self.hub.context.with_message(user_message))
        request = self._request(messages, allow_tools=self._settings.max_tool_rounds > 0)
        self._early = (messages, self._services.llm.generate(request, timeout=self._remaining()))

    def drop_early(self) -> None:
        if self._early is not None:
            self._early[1].cancel()
            self._early = None

    def message_stored(self, stored: history_pb2.AppendMessageResponse) -> None:
        self.user_message_id = stored.message.message_id
        self.user_message_stored = stored
        self._message_settled.set()

    def message_not_stored(self) -> None:
        self._message_settled.set()

    async def stored_message_id(self, timeout: float) -> str:
        """The id history gave this turn's user message, once it is stored; "" if it never was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._message_settled.wait(), timeout)
        return self.user_message_id

    async def run(self) -> None:
        try:
            await self._answer()
        finally:
            self.message_not_stored()  # settled either way once the turn ends
            self.drop_early()
            if self._speaker is not None:
                await self._speaker.close()
            try:
                await self._log_and_end()
            finally:
                self.hub.release_turn(self)
                self._finished.set()

    async def _answer(self) -> None:
        if self._failure is not None:
            return await self._end_failed(self._failure)
        if self._cancel_requested:
            return await self._end_cancelled()
        self._producer = asyncio.create_task(self._produce(), name=f"turn-{self.id}")
        try:
            finish_reason = await self._producer
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the gateway is stopping, not the user
                await self._end_interrupted()
                raise
            if self._failure is not None:
                await self._end_failed(self._failure)
            else:
                await self._end_cancelled()
        except DuplexError as error:
            await self._end_failed(error)
        except Exception:
            log.exception("turn %s failed", self.id)
            await self._end_failed(Internal("internal error"))
        else:
            await self._end_completed(finish_reason)

    async def _produce(self) -> int:
        """Call the model, running the tools it asks for, until it answers (bounded rounds)."""
        if self.utterance is not None:
            await self._hear()
        if self.session.voice.speak_answers:
            self._speaker = Speaker(
                self._services.llm, self.session.voice, self._publish, self.fail,
                self._settings.voice_audio_lead_ms / 1000, self._remaining(),
            )
        messages = self._prompt(await self._context())
        self._first_turn = len(messages) == 2  # the system prompt and this turn's own message
        for round_number in range(self._settings.max_tool_rounds + 1):
            allow_tools = round_number < self._settings.max_tool_rounds
            await self._generate(messages, allow_tools)
            if not self._round.tool_calls:
                if self._speaker is not None:
                    await self._speaker.finish()
                return self._round.finish_reason
            messages += await self._run_tools(round_number)
            self._close_round()
        raise Internal("the model kept asking for tools")

    async def _hear(self) -> None:
        """Wait for the utterance's final transcript and store it as this turn's user message."""
        limit = self._settings.voice_max_utterance_seconds + self._settings.rpc_timeout_seconds
        try:
            async with asyncio.timeout(limit):
                text = await self.utterance.transcript()
        except TimeoutError:
            raise DeadlineExceeded("the utterance went on too long, or its transcript took too long") from None
        if not text:
            raise InvalidArgument("no speech was recognized in the utterance")
        self._user_text = text[: self._settings.max_message_chars]
        self.client_message_id = self.utterance.client_message_id  # a commit may have named it meanwhile
        message = chat_pb2.UserMessage(client_message_id=self.client_message_id, text=self._user_text)
        self.ask_early()  # as for a typed message: the model starts while the transcript is stored
        stored = await self._services.history.append_message(_user_message(self.session, message))
        accepted = _accepted(self.session, message, stored.message.message_id, duplicate=stored.duplicate)
        self._publish(accepted)
        if stored.duplicate:
            raise AlreadyExists(f"utterance {self.client_message_id!r} was already answered")
        self.message_stored(stored)

    def _prompt(self, context: ConversationContext) -> list[llm_pb2.Message]:
        system_prompt = personas.system_prompt(
            self.session.persona, self.session.system_prompt, self._settings.default_system_prompt,
            context.first_user_text,
        )
        return [llm_pb2.Message(role=llm_pb2.ROLE_SYSTEM, content=system_prompt), *context.messages]

    def _request(self, messages: list[llm_pb2.Message], allow_tools: bool) -> llm_pb2.GenerateRequest:
        tools = self._services.tools.definitions() if allow_tools else []
        return llm_pb2.GenerateRequest(model=self.session.model, messages=messages, tools=tools)

    def _answer_to(self, messages: list[llm_pb2.Message], allow_tools: bool) -> Generation:
        """The early answer when it was asked with these very messages; else a new call."""
        early, self._early = self._early, None
        if early is not None and early[0] == messages:
            return early[1]
        if early is not None:
            early[1].cancel()
        return self._services.llm.generate(self._request(messages, allow_tools), timeout=self._remaining())

    async def _context(self) -> ConversationContext:
        """The conversation up to this turn's message: the hub's copy when it is current, else read back."""
        context = self.hub.context
        if context is None or not context.record(self.user_message_stored):
            context = await ConversationContext.load(
                self._services.history, self.session.user_id, self.session.conversation_id,
                self._settings.context_messages,
            )
            context.counted_at(self.user_message_stored)
            self.hub.keep_context(context)
        return context

    async def _generate(self, messages: list[llm_pb2.Message], allow_tools: bool) -> None:
        calls: list[llm_pb2.ToolCall] = []
        async for response in self._answer_to(messages, allow_tools):
            kind = response.WhichOneof("kind")
            if kind == "started":
                self._on_started(response.started)
            elif kind == "chunk":
                self._on_chunk(response.chunk)
            elif kind == "tool_call":
                calls.append(response.tool_call)
                self._publish(chat_pb2.ChatEvent(tool_call=chat_pb2.ToolCall(
                    call_id=response.tool_call.id, name=response.tool_call.name,
                    arguments_json=response.tool_call.arguments_json,
                )))
            elif kind == "finished":
                self._round.prompt_tokens = response.finished.prompt_tokens
                self._round.completion_tokens = response.finished.completion_tokens
                self._round.finish_reason = response.finished.finish_reason
                self._round.tool_calls = tuple(calls)
                return
        raise Unavailable("the model's stream ended before it finished")

    async def _run_tools(self, round_number: int) -> list[llm_pb2.Message]:
        """Run the round's tool calls as this user; store and publish each result; return the messages
        that carry the calls and results back to the model."""
        calls = self._round.tool_calls
        await self._store(history_pb2.AppendMessageRequest(
            role=history_pb2.ROLE_ASSISTANT, content=self._round.text, tool_calls_json=tool_calls_json(list(calls)),
            client_message_id=f"turn:{self.id}:round:{round_number}", model=self._model,
        ))
        context = ToolContext(user_id=self.session.user_id, history=self._services.history)
        results = await asyncio.gather(
            *(self._services.tools.run(call.name, call.arguments_json, context) for call in calls)
        )
        messages = [llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=self._round.text, tool_calls=calls)]
        for call, (result_json, is_error) in zip(calls, results, strict=True):
            self._publish(chat_pb2.ChatEvent(tool_result=chat_pb2.ToolResult(
                call_id=call.id, name=call.name, result_json=result_json, is_error=is_error,
            )))
            await self._store(history_pb2.AppendMessageRequest(
                role=history_pb2.ROLE_TOOL, content=result_json, tool_call_id=call.id, tool_name=call.name,
                client_message_id=f"turn:{self.id}:tool:{call.id}",
            ))
            messages.append(llm_pb2.Message(
                role=llm_pb2.ROLE_TOOL, content=result_json, tool_call_id=call.id, name=call.name
            ))
        return messages

    def _close_round(self) -> None:
        self._spoken_before_round += len(self._round.text)
        self._prompt_tokens += self._round.prompt_tokens
        self._completion_tokens += self._round.completion_tokens
        self._round = Round()

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the answer took longer than the turn's time limit")
        return remaining

    def _on_started(self, started: llm_pb2.GenerateStarted) -> None:
        self._round.prompt_tokens = started.prompt_tokens
        self._model = started.model  # the model that answers (a fallback may differ from the one asked for)
        if not self._announced:  # once per turn, not per tool round
            self._announced = True
            turn_started = chat_pb2.TurnStarted(user_message_id=self.user_message_id, model=started.model)
            self._publish(chat_pb2.ChatEvent(turn_started=turn_started))

    def _on_chunk(self, chunk: llm_pb2.TextChunk) -> None:
        now = time.monotonic()
        self._first_token_at = self._first_token_at or now
        self._last_token_at = now
        self._round.text += chunk.text
        self._round.completion_tokens += chunk.token_count
        if self._speaker is not None:
            self._speaker.say(chunk.text)
        delta = chat_pb2.ChatEvent(delta=chat_pb2.TextDelta(text=chunk.text))
        if chunk.HasField("produced_at"):  # a delta's time is when the model produced it
            delta.time.CopyFrom(chunk.produced_at)
        self._publish(delta)

    def _publish(self, event: chat_pb2.ChatEvent) -> None:
        event.turn_id = self.id
        self.hub.publish(event)
        self._answered = is_terminal(event)

    def _usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(
            prompt_tokens=self._prompt_tokens + self._round.prompt_tokens,
            completion_tokens=self._completion_tokens + self._round.completion_tokens,
            audio_input_ms=self.utterance.audio_ms if self.utterance is not None else 0,
            audio_output_ms=self._speaker.audio_ms if self._speaker is not None else 0,
        )

    async def _store(self, request: history_pb2.AppendMessageRequest, timeout: float | None = None) -> str:
        request.user_id = self.session.user_id
        request.conversation_id = self.session.conversation_id
        stored = await self._services.history.append_message(request, timeout)
        if self.hub.context is not None and not self.hub.context.record(stored):
            self.hub.keep_context(None)  # something else was stored meanwhile: the next turn reads it back
        return stored.message.message_id

    async def _store_reply(self, status: int) -> str:
        """Store the answer (whole or partial) once per turn; returns its message id, or "" when history
        cannot take it now and it is written later (history keeps one message per client_message_id)."""
        usage = self._usage()
        request = history_pb2.AppendMessageRequest(
            role=history_pb2.ROLE_ASSISTANT, content=self._round.text, status=status,
            client_message_id=f"turn:{self.id}", model=self._model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        )
        try:
            return await self._store(request, self._settings.answer_store_timeout_seconds)
        except DuplexError as error:
            if not error.retryable or not self._services.deferred_writes.add(request):
                raise
            log.warning("turn %s: history did not take the answer (%s); saving it once it is back", self.id,
                        error.message)
            self._saved_later = True
            self.hub.keep_context(None)  # the next turn reads the conversation back
            return ""

    async def _store_partial(self, status: int) -> str:
        if not self._round.text:
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
        if self._first_turn:  # titled before the turn ends, so a client refreshing its list sees it
            await self._name_conversation()
        completed = chat_pb2.TurnCompleted(
            finish_reason=_FINISH_REASONS.get(finish_reason, chat_pb2.FINISH_REASON_STOP),
            usage=self._usage(), assistant_message_id=message_id, tokens_per_second=self._tokens_per_second(),
            saved_later=self._saved_later,
        )
        if self._first_token_at is not None:
            completed.time_to_first_token.CopyFrom(_duration(self._first_token_at - self._started_at))
        self._publish(chat_pb2.ChatEvent(turn_completed=completed))

    def _tokens_per_second(self) -> float:
        if self._first_token_at is None or self._last_token_at == self._first_token_at:
            return 0.0
        return self._usage().completion_tokens / (self._last_token_at - self._first_token_at)

    async def _end_cancelled(self) -> None:
        if self._interrupted_at_ms is not None and self._speaker is not None:
            return await self._end_heard(self._interrupted_at_ms)
        message_id = await self._store_partial(history_pb2.MESSAGE_STATUS_CANCELLED)
        cancelled = chat_pb2.TurnCancelled(
            usage=self._usage(), assistant_message_id=message_id, saved_later=self._saved_later
        )
        self._publish(chat_pb2.ChatEvent(turn_cancelled=cancelled))

    async def _end_heard(self, played_ms: int) -> None:
        """An interrupted spoken answer: keep only the text spoken by `played_ms`."""
        heard_chars = self._speaker.heard_chars(played_ms)
        self._round.text = self._round.text[: max(0, heard_chars - self._spoken_before_round)]
        message_id = await self._store_partial(history_pb2.MESSAGE_STATUS_INTERRUPTED)
        cancelled = chat_pb2.TurnCancelled(
            usage=self._usage(), assistant_message_id=message_id, interrupted=True, played_ms=played_ms,
            heard_chars=heard_chars, saved_later=self._saved_later,
        )
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
        usage = self._usage()
        await self.hub.end_turn(
            self.id, usage.prompt_tokens + usage.completion_tokens, usage.audio_input_ms + usage.audio_output_ms
        )

    async def _name_conversation(self) -> None:
        """After a conversation's first answer, title it after the user's opening message."""
        try:
            await self._services.history.rename_conversation(
                self.session.user_id, self.session.conversation_id, title_from(self._user_text)
            )
        except DuplexError as error:
            log.warning("turn %s: conversation not titled: %s", self.id, error.message)


TITLE_CHARS = 60


def title_from(text: str) -> str:
    """The first words of a message, cut at a word boundary."""
    words = " ".join(text.split())
    if len(words) <= TITLE_CHARS:
        return words
    return words[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


def _user_message(session: SessionContext, message: chat_pb2.UserMessage) -> history_pb2.AppendMessageRequest:
    return history_pb2.AppendMessageRequest(
        user_id=session.user_id, conversation_id=session.conversation_id, role=history_pb2.ROLE_USER,
        content=message.text, status=history_pb2.MESSAGE_STATUS_COMPLETE,
        client_message_id=message.client_message_id,
    )


def _accepted(
    session: SessionContext, message: chat_pb2.UserMessage, message_id: str, duplicate: bool
) -> chat_pb2.ChatEvent:
    accepted = chat_pb2.MessageAccepted(
        message_id=message_id, client_message_id=message.client_message_id, duplicate=duplicate
    )
    return chat_pb2.ChatEvent(session_id=session.session_id, message_accepted=accepted)


# The session service reports an unlimited quota as the field's largest value.
_UNLIMITED_MESSAGES = 2**32 - 1
_UNLIMITED_TOKENS = 2**64 - 1
_UNLIMITED_AUDIO_SECONDS = 2**64 - 1


def _is_limited(quota, uses_audio: bool) -> bool:
    """Whether a quota event is worth sending: some limit applies (the audio one only to voice turns)."""
    return (
        quota.messages_remaining < _UNLIMITED_MESSAGES or quota.tokens_remaining < _UNLIMITED_TOKENS
        or (uses_audio and quota.audio_seconds_remaining < _UNLIMITED_AUDIO_SECONDS)
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class TurnManager:
    """Starts turns and owns their tasks; on shutdown it interrupts and awaits them."""

    def __init__(self, services: Services, hubs: HubRegistry, settings: GatewaySettings, owner: str):
        self._services = services
        self._hubs = hubs
        self._settings = settings
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()
        self._draining = False

    async def start(
        self, hub: SessionHub, session: SessionContext, message: chat_pb2.UserMessage
    ) -> tuple[Turn | None, chat_pb2.ChatEvent]:
        """Store the message and start answering it. Returns the turn and its logged message_accepted
        event, or (None, an ephemeral message_accepted) when the message is a duplicate."""
        self._validate(message)
        running = await self._running(hub)
        if running is not None and message.client_message_id == running.client_message_id != "":
            # A resend of the message being answered (say, after a reconnect, or sent on two streams at
            # once): acknowledged with the stored message's id once it is stored, not answered twice.
            message_id = await running.stored_message_id(self._settings.rpc_timeout_seconds)
            if message_id:
                return None, _accepted(session, message, message_id, duplicate=True)
        turn = self._reserve(hub, session, message)
        started = False
        try:
            try:
                begun = await self._begin(session, turn)
            except FailedPrecondition:
                stored_elsewhere = await self._stored_by_another_replica(session, message)
                if stored_elsewhere is None:
                    raise
                return None, _accepted(session, message, stored_elsewhere, duplicate=True)
            turn.ask_early()
            try:
                stored = await self._services.history.append_message(_user_message(session, message))
            except BaseException:
                await self._end_quietly(session, turn)
                raise
            if stored.duplicate:  # stored once and answered once already
                await self._end_quietly(session, turn)
                return None, _accepted(session, message, stored.message.message_id, duplicate=True)
            turn.message_stored(stored)
            started = True
        finally:
            if not started:
                turn.message_not_stored()
                turn.drop_early()
                hub.release_turn(turn)
        await self._take_over(hub, session, begun)
        accepted = _accepted(session, message, turn.user_message_id, duplicate=False)
        accepted.turn_id = turn.id
        event = hub.publish(accepted)
        self._launch(hub, turn, begun)
        return turn, event

    async def begin_voice_turn(self, hub: SessionHub, session: SessionContext, utterance: Utterance) -> Turn:
        """Start the turn of an utterance being heard; its message comes with the final transcript."""
        await self._running(hub)
        message = chat_pb2.UserMessage(client_message_id=utterance.client_message_id)
        turn = self._reserve(hub, session, message, utterance)
        try:
            begun = await self._begin(session, turn)
        except BaseException:
            hub.release_turn(turn)
            raise
        await self._take_over(hub, session, begun)
        self._launch(hub, turn, begun)
        return turn

    async def _running(self, hub: SessionHub) -> Turn | None:
        """The turn running in the session, once a turn that already answered has logged its end."""
        if self._draining:
            raise Unavailable("this server is shutting down; reconnect and send the message again")
        running = hub.turn
        if running is not None and running.answered:
            # The client saw the previous turn end; it is only logging its last events. Wait for that.
            await asyncio.wait_for(running.wait_finished(), self._settings.rpc_timeout_seconds)
            running = hub.turn
        return running

    def _reserve(
        self, hub: SessionHub, session: SessionContext, message: chat_pb2.UserMessage,
        utterance: Utterance | None = None,
    ) -> Turn:
        """Take the session's turn slot before the first await, so concurrent messages are refused."""
        turn = Turn(hub, session, message, self._services, self._settings, utterance)
        hub.take_turn(turn)
        if hub.context is None and session.new_conversation:
            hub.keep_context(ConversationContext.empty(self._settings.context_messages))
        return turn

    async def _begin(self, session: SessionContext, turn: Turn) -> session_pb2.BeginTurnResponse:
        hub = turn.hub
        if hub.unsent_end is not None:  # the previous turn here must end in the session service first
            await hub.flush()
            if not await hub.send_end():
                raise Unavailable("the session service has not recorded the previous answer's end; try again")
        return await self._services.sessions.begin_turn(
            session.user_id, session.session_id, turn.id, self.owner, uses_audio=turn.uses_audio
        )

    async def _stored_by_another_replica(self, session: SessionContext, message: chat_pb2.UserMessage) -> str | None:
        """The stored id of `message` when the turn another replica runs is answering this very message (the
        same client_message_id sent through two replicas at once); None when it is another message. That
        replica stores the message just after taking the turn, so it is looked for a little while."""
        if not message.client_message_id:
            return None
        deadline = time.monotonic() + SAME_MESSAGE_ELSEWHERE_WAIT_SECONDS
        while True:
            newest = await self._services.history.list_messages(
                session.user_id, session.conversation_id, page_size=4, newest_first=True
            )
            for stored in newest.messages:
                if stored.client_message_id == message.client_message_id:
                    return stored.message_id
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def _take_over(self, hub: SessionHub, session: SessionContext, begun: session_pb2.BeginTurnResponse) -> None:
        hub.restart_at(begun.last_seq)
        if begun.taken_over_turn_id:  # its gateway died mid-answer: end it in the log before this one starts
            await end_abandoned_turn(
                self._services.sessions, self._services.history, hub, session.conversation_id,
                begun.taken_over_turn_id,
            )

    def _launch(self, hub: SessionHub, turn: Turn, begun: session_pb2.BeginTurnResponse) -> None:
        """Say what is left of the quota, and run the turn in a task of its own."""
        if _is_limited(begun.quota, turn.uses_audio):
            quota = chat_pb2.QuotaUpdate(
                messages_remaining=begun.quota.messages_remaining, tokens_remaining=begun.quota.tokens_remaining,
            )
            if turn.uses_audio:
                quota.audio_seconds_remaining = begun.quota.audio_seconds_remaining
            hub.publish(chat_pb2.ChatEvent(turn_id=turn.id, quota=quota))
        self._hubs.acquire(hub.session_id, hub.user_id, hub.last_seq)  # the turn's own reference
        task = asyncio.create_task(self._run(turn), name=f"turn-run-{turn.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_quietly(self, session: SessionContext, turn: Turn) -> None:
        """End a turn that never answered: its message is a duplicate, or was not stored."""
        try:
            await self._services.sessions.end_turn(session.session_id, turn.id, unanswered=True)
        except DuplexError as error:
            log.warning("turn %s: could not release the session: %s", turn.id, error.message)

    def _validate(self, message: chat_pb2.UserMessage) -> None:
        limit = self._settings.max_message_chars
        if not message.text.strip():
            raise InvalidArgument("message text is empty")
        if len(message.text) > limit:
            raise InvalidArgument(f"message text is longer than {limit} characters")
        if len(message.client_message_id) > MAX_CLIENT_MESSAGE_ID_CHARS:
            raise InvalidArgument(f"client_message_id is longer than {MAX_CLIENT_MESSAGE_ID_CHARS} characters")

    async def _run(self, turn: Turn) -> None:
        try:
            await turn.run()
        except Exception:  # a bug in the turn's bookkeeping must not vanish into an unretrieved task
            log.exception("turn %s: unexpected failure", turn.id)
        finally:
            await self._hubs.release(turn.hub)

    async def drain(self) -> None:
        """Refuse new turns and let the running ones finish (the caller bounds how long)."""
        self._draining = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Interrupt every running turn (each ends with a retryable error event) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
