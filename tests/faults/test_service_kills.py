"""SIGKILL an inner service while 30 answers stream, with every service a real process.

The demo model answers at 10 tokens/s (~45 tokens: ~4.5 s), so every answer is mid-way when llm_service,
session_service or history_service is killed. Each kill, on the embedded stores and on Redis + PostgreSQL
where the store matters:
- every stream ends within a bound measured from the kill, with its turn completed or an error event that
  says retryable; nothing hangs;
- the answer stored is the text its client received (session_service on memory: starts with it, since the
  turn goes on after its stream ended and the client can never resume it);
- the service started again on the same port serves a fresh session.

The in-process versions with one stream are tests/gateway/test_session_service_outage.py,
test_history_outage.py and test_errors.py; this is the process-level, SIGKILL, many-streams one.
"""

import asyncio
import itertools
import statistics
import time

import grpc
import pytest

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from history_service.migrate import migrate
from history_service.settings import HistorySettings
from tests.faults.service_processes import ServiceProcesses
from tests.gateway.chat_helpers import ChatStream, is_turn_end, text_of
from tests.postgres_fixtures import postgres_databases, postgres_url, run_async  # noqa: F401 - fixtures
from tests.redis_fixtures import redis_key_prefix, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(90)

STREAMS = 30
TOKENS_PER_SECOND = 10
FIRST_DELTAS = 3  # each answer is this far along when a service is killed
END_WITHIN_SECONDS = 5.0  # every stream's end (or its retryable error) after the kill
PROMPT_SECONDS = 5.0  # an open while a service is down is refused within this
STORE_TIMEOUT_SECONDS = 3.0  # the gateway's DUPLEX_ANSWER_STORE_TIMEOUT_SECONDS default
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def kind(event: chat_pb2.ChatEvent) -> str:
    return event.WhichOneof("kind")


class Stream(ChatStream):
    """One client's Chat stream that also keeps each event it receives, and how the stream ended: an
    error event is an answer here, not a failed assertion."""

    def __init__(self, channel: grpc.aio.Channel):
        super().__init__(chat_pb2_grpc.ChatServiceStub(channel))
        self.events: list[chat_pb2.ChatEvent] = []
        self.end: chat_pb2.ChatEvent | None = None  # the turn's end, or the error the stream ended with
        self.ended_at = 0.0
        self.status: grpc.StatusCode | None = None  # set when the server ended the stream

    async def _next(self) -> chat_pb2.ChatEvent | None:
        """The next event; None once the stream ended (its status in self.status)."""
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as error:
            self.status = error.code()
            return None
        if response is grpc.aio.EOF:
            self.status = await self.call.code()
            return None
        self.events.append(response.event)
        self.received_at.append(time.monotonic())
        return response.event

    async def open(self, timeout: float = 10.0, **fields) -> chat_pb2.ChatEvent:
        """Open (or re-attach to) a session; the first event: session_opened, or the error refusing it."""
        await self.send(open=chat_pb2.OpenSession(**fields))
        async with asyncio.timeout(timeout):
            event = await self._next()
        assert event is not None, f"the stream ended ({self.status}) before answering the open"
        return event

    @property
    def opened(self) -> chat_pb2.SessionOpened:
        return self.events[0].session_opened

    async def until_deltas(self, count: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.deltas) < count:
                event = await self._next()
                assert event is not None and kind(event) != "error", (event, self.status)

    async def to_end(self, timeout: float = 20.0) -> chat_pb2.ChatEvent:
        """Read until the turn ends, or until the stream ends after an error event saying why."""
        try:
            async with asyncio.timeout(timeout):
                while (event := await self._next()) is not None:
                    if is_turn_end(event):
                        self.end, self.ended_at = event, time.monotonic()
                        return event
                    if kind(event) == "error":  # about the stream, not the turn: the stream ends next
                        self.end, self.ended_at = event, time.monotonic()
        except TimeoutError:
            pytest.fail(f"stream hangs: no end after {timeout} s; its last events: {self.events[-3:]}")
        assert self.end is not None, f"the stream ended ({self.status}) without an event saying why"
        return self.end

    @property
    def deltas(self) -> list[chat_pb2.ChatEvent]:
        return [event for event in self.events if kind(event) == "delta"]

    def text(self) -> str:
        return text_of(self.events)

    @property
    def last_seq(self) -> int:
        return max(event.seq for event in self.events)



async def start_answers(channel: grpc.aio.Channel) -> list[Stream]:
    """STREAMS sessions, each with an answer FIRST_DELTAS tokens along."""
    async def one(n: int) -> Stream:
        stream = Stream(channel)
        opened = await stream.open()
        assert kind(opened) == "session_opened", opened
        await stream.say(f"tell me a long story, number {n}")
        await stream.until_deltas(FIRST_DELTAS)
        return stream

    return list(await asyncio.gather(*(one(n) for n in range(STREAMS))))


async def all_end(streams: list[Stream], killed_at: float) -> list[float]:
    """Every stream's end; the seconds from the kill to each."""
    await asyncio.gather(*(stream.to_end() for stream in streams))
    return [stream.ended_at - killed_at for stream in streams]


def figures(seconds: list[float]) -> str:
    return f"p50 {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s"


async def with_retries(call, timeout: float = 15.0):
    """A unary call to the gateway, again a little later while it is UNAVAILABLE (a service coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


async def stored_answers(channel: grpc.aio.Channel, conversation_id: str) -> list[conversation_pb2.Message]:
    stub = conversation_pb2_grpc.ConversationServiceStub(channel)
    request = conversation_pb2.GetConversationRequest(conversation_id=conversation_id)
    reply = await with_retries(lambda: stub.GetConversation(request, timeout=5))
    return [message for message in reply.messages if message.role == conversation_pb2.MESSAGE_ROLE_ASSISTANT]


async def the_stored_answer(
    channel: grpc.aio.Channel, conversation_id: str, timeout: float = 20.0
) -> conversation_pb2.Message:
    """The conversation's one answer, once it is stored (a turn still running, or an answer saved later)."""
    deadline = time.monotonic() + timeout
    while not (answers := await stored_answers(channel, conversation_id)):
        assert time.monotonic() < deadline, f"no answer stored in {conversation_id} after {timeout} s"
        await asyncio.sleep(0.2)
    assert len(answers) == 1, f"the answer is stored {len(answers)} times: {answers}"
    return answers[0]


async def refused_open(channel: grpc.aio.Channel) -> float:
    """A new session while a service is down: a prompt, retryable UNAVAILABLE error event. Its seconds."""
    stream = Stream(channel)
    asked_at = time.monotonic()
    event = await stream.open(timeout=PROMPT_SECONDS)
    seconds = time.monotonic() - asked_at
    stream.cancel()
    assert kind(event) == "error" and event.error.retryable and event.error.code == UNAVAILABLE, event
    return seconds


async def fresh_turn(channel: grpc.aio.Channel, timeout: float = 20.0) -> int:
    """A new session and message on a new stream, opened again a little later after each retryable error
    (as clients are told) until it is answered; returns how many tries that took."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count(1):
        stream = Stream(channel)
        try:
            end = await stream.open()
            if kind(end) == "session_opened":
                await stream.say("hello again")
                end = await stream.to_end()
                if kind(end) == "turn_completed":
                    assert stream.text()
                    return attempt
        finally:
            stream.cancel()
        assert kind(end) == "error" and end.error.retryable, f"not retryable: {end}"
        assert time.monotonic() < deadline, f"still refused after {timeout} s: {end}"
        await asyncio.sleep(0.25)


@pytest.fixture
def stores(request, tmp_path) -> dict[str, dict[str, str]]:
    """The services' store settings: "embedded" (session_service's memory store, history's SQLite file in
    a fresh data dir) or "redis+postgresql" (a fresh key prefix and a migrated database)."""
    if request.param == "embedded":
        return {"history_service": {"DUPLEX_DATA_DIR": str(tmp_path / "data")}}
    database = request.getfixturevalue("postgres_databases").create()
    run_async(migrate(HistorySettings(database_url=database)))
    return {
        "session_service": {"DUPLEX_REDIS_URL": request.getfixturevalue("redis_url"),
                            "DUPLEX_REDIS_KEY_PREFIX": request.getfixturevalue("redis_key_prefix")},
        "history_service": {"DUPLEX_DATABASE_URL": database},
    }


@pytest.fixture
async def services(stores):
    settings = {
        "llm_service": {"DUPLEX_LOCAL_TOKENS_PER_SECOND": str(TOKENS_PER_SECOND), "DUPLEX_LLM_COALESCE_WINDOW_MS": "0"},
        "session_service": stores.get("session_service", {}),
        "history_service": stores["history_service"],
    }
    async with ServiceProcesses(overrides=settings) as running:
        yield running


@pytest.fixture
async def channel(services):
    async with grpc.aio.insecure_channel(services.gateway) as gateway:
        yield gateway


BOTH = pytest.mark.parametrize("stores", ["embedded", "redis+postgresql"], indirect=True)


@pytest.mark.parametrize("stores", ["embedded"], indirect=True)  # the answer's store is history's, as below
async def test_killed_llm_service_ends_every_answer_with_a_retryable_error_and_stores_what_was_sent(
    services, channel
):
    streams = await start_answers(channel)
    killed_at = await services.kill("llm_service")
    seconds = await all_end(streams, killed_at)

    for stream in streams:
        assert kind(stream.end) == "error" and stream.end.turn_id, stream.end
        assert stream.end.error.retryable and stream.end.error.code == UNAVAILABLE, stream.end
        stream.cancel()
    assert max(seconds) < END_WITHIN_SECONDS, figures(seconds)

    # The partial answer is stored as cut short, with exactly the text its client got.
    for stream in streams:
        answer = await the_stored_answer(channel, stream.opened.conversation_id)
        assert answer.status == conversation_pb2.MESSAGE_STATUS_ERROR
        assert answer.content == stream.text() and len(stream.deltas) >= FIRST_DELTAS

    restarted_in = await services.start("llm_service")
    tries = await fresh_turn(channel)
    print(f"\nllm_service killed under {STREAMS} streams: each ended {figures(seconds)} after the kill; "
          f"{STREAMS} partial answers stored; restarted in {restarted_in:.1f} s; a fresh turn took {tries} tries")


@BOTH
async def test_killed_session_service_ends_every_stream_retryably_and_a_restart_serves_again(
    services, channel, stores
):
    on_redis = "session_service" in stores
    streams = await start_answers(channel)
    killed_at = await services.kill("session_service")
    refused_in, seconds = await asyncio.gather(refused_open(channel), all_end(streams, killed_at))

    ended_streams = [stream for stream in streams if kind(stream.end) == "error"]
    for stream in streams:
        if stream in ended_streams:  # held back by a log that takes nothing: the stream ends, to be resumed
            assert not stream.end.turn_id and stream.end.seq == 0, stream.end
            assert stream.end.error.retryable and stream.end.error.code == UNAVAILABLE, stream.end
            assert "resume after seq" in stream.end.error.message, stream.end
            assert stream.status == grpc.StatusCode.UNAVAILABLE
        else:  # answered before the log held it back
            assert kind(stream.end) == "turn_completed", stream.end
            stream.cancel()
    assert max(seconds) < END_WITHIN_SECONDS, figures(seconds)
    assert refused_in < PROMPT_SECONDS

    restarted_in = await services.start("session_service")
    reopened_in = await asyncio.gather(*(reattach(channel, stream, on_redis) for stream in ended_streams))

    statuses = []
    for stream in streams:
        answer = await the_stored_answer(channel, stream.opened.conversation_id)
        statuses.append(conversation_pb2.MessageStatus.Name(answer.status))
        if on_redis or kind(stream.end) == "turn_completed":
            # Every event once and in order, the resumed ones included; the whole answer stored.
            seqs = [event.seq for event in stream.events if event.seq]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
            assert answer.status == conversation_pb2.MESSAGE_STATUS_COMPLETE
            assert answer.content == stream.text()
        else:  # the store lost the session: the turn went on without its client, who got the start of it
            assert answer.status in (conversation_pb2.MESSAGE_STATUS_COMPLETE, conversation_pb2.MESSAGE_STATUS_ERROR)
            assert answer.content.startswith(stream.text()) and len(stream.deltas) >= FIRST_DELTAS

    tries = await fresh_turn(channel)
    store = "Redis" if on_redis else "memory"
    print(f"\nsession_service ({store}) killed under {STREAMS} streams: each ended {figures(seconds)} after the kill "
          f"({len(ended_streams)} with a retryable error, {STREAMS - len(ended_streams)} completed); an open while "
          f"down was refused in {refused_in:.3f} s; restarted in {restarted_in:.1f} s; "
          f"{len(ended_streams)} re-attached in {figures(reopened_in or [0.0])}; {STREAMS} answers stored "
          f"({', '.join(f'{statuses.count(name)} {name}' for name in sorted(set(statuses)))}); "
          f"a fresh turn took {tries} tries")


async def reattach(channel: grpc.aio.Channel, stream: Stream, on_redis: bool) -> float:
    """What the client of a stream that ended retryably does: open its session again, resuming after the
    last seq it saw, again a little later while the service is not back. On Redis the rest of the answer
    follows, to the turn's end; a memory store lost the session: a clean NOT_FOUND, never a stall.
    Returns the seconds until it was re-attached (or refused for good)."""
    started_at = time.monotonic()
    session_id = stream.opened.session_id
    while True:
        again = Stream(channel)
        event = await again.open(session_id=session_id, resume_after_seq=stream.last_seq)
        if kind(event) != "error" or not event.error.retryable:
            break
        again.cancel()
        assert time.monotonic() - started_at < 15, f"{session_id} still refused: {event}"
        await asyncio.sleep(0.25)
    reattached_in = time.monotonic() - started_at
    if on_redis:
        assert kind(event) == "session_opened" and event.session_opened.resumed, event
        end = await again.to_end()
        stream.events += [event for event in again.events if event.seq]
        assert kind(end) == "turn_completed", end
    else:
        assert event.error.code == NOT_FOUND, event
    again.cancel()
    return reattached_in


@BOTH
async def test_killed_history_service_ends_every_answer_and_saves_each_once_it_is_back(services, channel):
    streams = await start_answers(channel)
    killed_at = await services.kill("history_service")
    refused_in, seconds = await asyncio.gather(refused_open(channel), all_end(streams, killed_at))

    # The answers go on to their end; history cannot take them then, so each says it is saved later.
    told_after = []
    for stream in streams:
        assert kind(stream.end) == "turn_completed", stream.end
        assert stream.end.turn_completed.saved_later and not stream.end.turn_completed.assistant_message_id
        last_delta = max(i for i, event in enumerate(stream.events) if kind(event) == "delta")
        told_after.append(stream.ended_at - stream.received_at[last_delta])
        stream.cancel()
    assert max(told_after) < STORE_TIMEOUT_SECONDS, figures(told_after)  # told at once, not after a wait
    assert max(seconds) < END_WITHIN_SECONDS + 1, figures(seconds)  # the answers' own remaining time
    assert refused_in < PROMPT_SECONDS

    restarted_in = await services.start("history_service")
    saved_at = time.monotonic()
    for stream in streams:
        answer = await the_stored_answer(channel, stream.opened.conversation_id)
        assert answer.status == conversation_pb2.MESSAGE_STATUS_COMPLETE
        assert answer.content == stream.text()
    saved_in = time.monotonic() - saved_at

    tries = await fresh_turn(channel)
    print(f"\nhistory_service killed under {STREAMS} streams: each completed {figures(seconds)} after the kill "
          f"(saved_later, {figures(told_after)} after its last token); an open while down was refused in "
          f"{refused_in:.3f} s; restarted in {restarted_in:.1f} s; "
          f"all {STREAMS} answers stored once within {saved_in:.1f} s of it; a fresh turn took {tries} tries")
