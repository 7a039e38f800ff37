"""Stop from any replica: CancelTurn, an in-stream cancel or interrupt, and CloseSession reach a turn running
on another gateway, through the session service (memory store: both gateways share one session service;
Redis: each gateway has its own session service on one Redis, so the request crosses pub/sub too)."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from chat_helpers import ChatStream, kinds, text_of

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.common.server import GrpcServer, wait_until_serving
from duplex.history.v1 import history_pb2
from duplex.session.v1 import session_pb2
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from session_service.server import create_server as create_session
from session_service.settings import SessionSettings
from tests.conftest import LOOPBACK_ANY_PORT, System
from tests.fake_openai import FakeOpenAI, FakeReply
from tests.redis_fixtures import redis_key_prefix, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)

LONG_ANSWER = FakeReply(chunks=[f" This is sentence {n}." for n in range(300)], pace=0.05)
CANCEL_BOUND_SECONDS = 0.5  # the bound, as the same-replica test holds it
UNLIMITED = {"quota_messages_per_minute": 0, "quota_tokens_per_day": 0, "quota_audio_seconds_per_day": 0}


@dataclass
class Replicas:
    """Gateway A (the system's own) and gateway B, with the services behind them."""

    system: System
    fake: FakeOpenAI
    gateway_b: GrpcServer
    session_b: GrpcServer | None  # B's own session service (Redis); None when B shares A's
    redis: dict  # the session services' Redis settings; empty for the memory store

    @property
    def a(self) -> chat_pb2_grpc.ChatServiceStub:
        return self.system.chat

    @property
    def b(self) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(self.system.channel(self.gateway_b))

    async def stop(self) -> None:
        await self.gateway_b.stop(0)
        if self.session_b is not None:
            await self.session_b.stop(0)


@contextlib.asynccontextmanager
async def started_replicas(make_system, redis: dict) -> AsyncIterator[Replicas]:
    async with FakeOpenAI() as fake:
        models = {"llm_models": [{"name": "fake-gpt", "base_url": fake.base_url}]}
        system = await make_system(session_overrides=redis, llm_overrides=models)
        session_b = None
        session_port = system.session.port
        if redis:
            session_b = await create_session(session_settings(system, LOOPBACK_ANY_PORT, redis))
            session_port = session_b.port
        gateway_b = await create_gateway(GatewaySettings(
            gateway_listen=LOOPBACK_ANY_PORT, http_listen="", llm_target=f"127.0.0.1:{system.llm.port}",
            session_target=f"127.0.0.1:{session_port}", history_target=f"127.0.0.1:{system.history.port}",
        ))
        running = Replicas(system, fake, gateway_b, session_b, redis)
        try:
            await asyncio.wait_for(wait_until_serving(system.channel(gateway_b), "duplex.chat.v1.ChatService"), 10)
            yield running
        finally:
            await running.stop()


def session_settings(system: System, listen: str, redis: dict) -> SessionSettings:
    return SessionSettings(
        session_listen=listen, history_target=f"127.0.0.1:{system.history.port}", **redis, **UNLIMITED
    )


@pytest.fixture
async def redis_replicas(make_system, redis_url, redis_key_prefix):  # noqa: F811
    async with started_replicas(make_system, {"redis_url": redis_url, "redis_key_prefix": redis_key_prefix}) as running:
        yield running


@pytest.fixture(params=["memory", "redis"])
async def replicas(request, make_system):
    redis = {}
    if request.param == "redis":
        redis = {name: request.getfixturevalue(name) for name in ("redis_url", "redis_key_prefix")}
    async with started_replicas(make_system, redis) as running:
        yield running


async def answering_on_a(replicas: Replicas, **open_fields) -> tuple[ChatStream, chat_pb2.ChatEvent, list]:
    """A Chat stream to gateway A whose turn is streaming its answer."""
    replicas.fake.script(LONG_ANSWER)
    chat = ChatStream(replicas.a)
    opened = await chat.open(model="fake-gpt", **open_fields)
    await chat.say("talk for a long time")
    events = await chat.until("delta")
    return chat, opened, events


async def assert_ended_cancelled(replicas: Replicas, chat: ChatStream, events: list, asked_at: float) -> None:
    """The turn ended turn_cancelled with usage within the bound, the upstream request was closed, and
    nothing of the answer followed."""
    events += await chat.until_turn_ends(timeout=5)
    assert kinds(events)[-1] == "turn_cancelled", events[-1]
    [disconnected_at] = await replicas.fake.wait_for_disconnects(1, timeout=2)
    assert disconnected_at - asked_at < CANCEL_BOUND_SECONDS
    usage = events[-1].turn_cancelled.usage
    assert usage.completion_tokens == len([e for e in events if e.WhichOneof("kind") == "delta"]) > 0
    await chat.send(ping=chat_pb2.Ping(nonce="after"))
    assert kinds(await chat.until("pong")) == ["pong"]


async def test_cancel_turn_on_another_replica_stops_the_answer(replicas):
    chat, opened, events = await answering_on_a(replicas)
    asked_at = time.monotonic()
    response = await replicas.b.CancelTurn(
        chat_pb2.CancelTurnRequest(session_id=opened.session_opened.session_id, turn_id=events[0].turn_id), timeout=5
    )
    assert response.cancelled
    await assert_ended_cancelled(replicas, chat, events, asked_at)

    stored = await replicas.system.history_store.ListMessages(history_pb2.ListMessagesRequest(
        user_id="local", conversation_id=opened.session_opened.conversation_id,
    ))
    assert stored.messages[-1].status == history_pb2.MESSAGE_STATUS_CANCELLED
    assert stored.messages[-1].content == text_of(events)
    chat.cancel()


async def test_cancel_turn_on_another_replica_says_false_when_no_such_turn_runs(replicas):
    chat, opened, _ = await answering_on_a(replicas)
    session_id = opened.session_opened.session_id
    other = await replicas.b.CancelTurn(chat_pb2.CancelTurnRequest(session_id=session_id, turn_id="not-it"))
    assert not other.cancelled
    await asyncio.sleep(0.3)
    assert (await chat.next_event()).WhichOneof("kind") == "delta"  # still answering

    await replicas.a.CancelTurn(chat_pb2.CancelTurnRequest(session_id=session_id))
    await chat.until_turn_ends(timeout=5)
    # The client sees the end a moment before its replica tells the session service (after logging it);
    # a cancel in that moment is "asked", and harmless. Once told, it is False.
    request = session_pb2.GetSessionRequest(user_id="local", session_id=session_id)
    for _ in range(500):
        if not (await replicas.system.session_store.GetSession(request)).session.active_turn_id:
            break
        await asyncio.sleep(0.01)
    after = await replicas.b.CancelTurn(chat_pb2.CancelTurnRequest(session_id=session_id))
    assert not after.cancelled
    chat.cancel()


async def test_a_cancel_sent_on_a_stream_to_another_replica_stops_the_turn(replicas):
    chat, opened, events = await answering_on_a(replicas)
    on_b = ChatStream(replicas.b)
    session_id = opened.session_opened.session_id
    await on_b.open(session_id=session_id, resume_after_seq=events[-1].seq)
    asked_at = time.monotonic()
    await on_b.send(cancel=chat_pb2.Cancel(turn_id=events[0].turn_id))
    await assert_ended_cancelled(replicas, chat, events, asked_at)
    followed = await on_b.until_turn_ends(timeout=5)  # B follows the turn it stopped to its end
    assert kinds(followed)[-1] == "turn_cancelled"
    chat.cancel()
    on_b.cancel()


async def test_close_session_on_another_replica_ends_the_turn_first(replicas):
    chat, opened, events = await answering_on_a(replicas)
    session_id = opened.session_opened.session_id
    asked_at = time.monotonic()
    await replicas.b.CloseSession(chat_pb2.CloseSessionRequest(session_id=session_id), timeout=10)
    closed_at = time.time()  # wall clock, as event times are
    events += await chat.until_turn_ends(timeout=5)
    assert kinds(events)[-1] == "turn_cancelled"
    assert events[-1].time.ToNanoseconds() / 1e9 <= closed_at  # ended before CloseSession answered
    [disconnected_at] = await replicas.fake.wait_for_disconnects(1, timeout=2)
    assert disconnected_at - asked_at < CANCEL_BOUND_SECONDS
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await replicas.system.session_store.GetSession(
            session_pb2.GetSessionRequest(user_id="local", session_id=session_id)
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    chat.cancel()


async def test_an_interrupt_sent_to_another_replica_keeps_what_was_heard(replicas):
    chat, opened, events = await answering_on_a(replicas, voice=chat_pb2.VoiceOptions(speak_answers=True))
    while len(of_kind(events, "audio")) < 2:
        events.append(await chat.next_event(timeout=30))
    audio = of_kind(events, "audio")
    on_b = ChatStream(replicas.b)
    await on_b.open(session_id=opened.session_opened.session_id, resume_after_seq=events[-1].seq)
    await on_b.send(interrupt=chat_pb2.Interrupt(turn_id=events[0].turn_id, played_ms=audio[0].duration_ms))
    events += await chat.until_turn_ends(timeout=10)

    cancelled = events[-1].turn_cancelled
    assert cancelled.interrupted and cancelled.played_ms == audio[0].duration_ms
    assert cancelled.heard_chars == audio[0].text_end
    stored = await replicas.system.history_store.ListMessages(history_pb2.ListMessagesRequest(
        user_id="local", conversation_id=opened.session_opened.conversation_id,
    ))
    assert stored.messages[-1].status == history_pb2.MESSAGE_STATUS_INTERRUPTED
    assert stored.messages[-1].content == text_of(events)[: cancelled.heard_chars]
    chat.cancel()
    on_b.cancel()


async def test_a_cancel_asked_while_the_owner_was_not_watching_reaches_it_once_it_watches_again(redis_replicas):
    # Redis only: with the memory store, a session service that stops loses the session with the request.
    replicas = redis_replicas
    chat, opened, events = await answering_on_a(replicas)
    session_a = replicas.system.session
    await session_a.stop(0)  # A's watch breaks; the turn goes on (its events wait for the log)
    response = await replicas.b.CancelTurn(
        chat_pb2.CancelTurnRequest(session_id=opened.session_opened.session_id), timeout=5
    )
    assert response.cancelled  # recorded on the turn in Redis; the publish found nobody listening
    await asyncio.sleep(0.5)
    assert not replicas.fake.disconnects

    restarted = await create_session(session_settings(replicas.system, f"127.0.0.1:{session_a.port}", replicas.redis))
    try:
        events += await chat.until_turn_ends(timeout=20)
        assert kinds(events)[-1] == "turn_cancelled", events[-1]
        assert await replicas.fake.wait_for_disconnects(1, timeout=2)
    finally:
        await restarted.stop(0)
    chat.cancel()


def of_kind(events, kind: str) -> list:
    return [getattr(event, kind) for event in events if event.WhichOneof("kind") == kind]
