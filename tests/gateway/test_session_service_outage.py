"""The session service stops during live streams: every stream ends with an error event instead of stalling,
nothing is lost where the store survives (Redis), a session the store lost (memory) ends cleanly, and the
gateway says so in a few log lines, not one per retry."""

import asyncio
import contextlib
import logging
import time

import grpc
import pytest
from chat_helpers import ChatStream, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2
from session_service.server import create_server as create_session
from session_service.settings import SessionSettings
from tests.conftest import System
from tests.fake_openai import FakeOpenAI, FakeReply
from tests.redis_fixtures import redis_key_prefix, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)

OUTAGE_SECONDS = 1.0
LONG_ANSWER = FakeReply(chunks=[f" This is sentence {n}." for n in range(200)], pace=0.03)
UNLIMITED = {"quota_messages_per_minute": 0, "quota_tokens_per_day": 0, "quota_audio_seconds_per_day": 0}


async def restart_session_service(system: System, store: dict) -> None:
    """A new session service on the same port (the gateway's channel finds it again)."""
    system.session = await create_session(SessionSettings(**{
        "session_listen": f"127.0.0.1:{system.session.port}", "history_target": f"127.0.0.1:{system.history.port}",
        "redis_url": None, **UNLIMITED, **store,
    }))


async def streaming(make_system, fake: FakeOpenAI, store: dict) -> tuple[System, ChatStream, list]:
    system = await make_system(
        session_overrides=store, llm_overrides={"llm_models": [{"name": "fake-gpt", "base_url": fake.base_url}]},
        session_log_outage_seconds=OUTAGE_SECONDS,
    )
    fake.script(LONG_ANSWER)
    chat = ChatStream(system.chat)
    opened = await chat.open(model="fake-gpt")
    await chat.say("talk for a long time")
    events = [opened] + await chat.until("delta")
    return system, chat, events


async def reopen(system: System, **fields) -> ChatStream:
    """Open as a client does after a retryable error: again, a little later, until the service is back."""
    for _ in range(20):
        chat = ChatStream(system.chat)
        await chat.send(open=chat_pb2.OpenSession(**fields))
        event = await chat.next_event()
        if event.WhichOneof("kind") == "session_opened":
            return chat
        assert event.error.retryable, event
        chat.cancel()
        await asyncio.sleep(0.25)
    raise AssertionError("the session service did not come back")


async def until_stream_ends(chat: ChatStream, timeout: float) -> tuple[list, grpc.StatusCode]:
    events = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(grpc.aio.AioRpcError):  # the stream's status, read below
            while (response := await chat.call.read()) is not grpc.aio.EOF:
                events.append(response.event)
        return events, await chat.call.code()


async def test_a_stopped_session_service_ends_streams_with_a_retryable_error_and_a_resume_loses_nothing(
    make_system, redis_url, redis_key_prefix  # noqa: F811
):
    store = {"redis_url": redis_url, "redis_key_prefix": redis_key_prefix}
    async with FakeOpenAI() as fake:
        system, chat, events = await streaming(make_system, fake, store)
        session_id, turn_id = events[0].session_opened.session_id, events[1].turn_id
        await system.session.stop(0)
        stopped_at = time.monotonic()

        rest, status = await until_stream_ends(chat, timeout=OUTAGE_SECONDS + 5)
        assert time.monotonic() - stopped_at < OUTAGE_SECONDS + 3
        assert status == grpc.StatusCode.UNAVAILABLE
        goodbye = rest[-1]
        assert goodbye.seq == 0 and goodbye.error.retryable and "resume after seq" in goodbye.error.message
        seen = events[1:] + rest[:-1]

        await restart_session_service(system, store)
        again = await reopen(system, session_id=session_id, resume_after_seq=seen[-1].seq)
        seen += await again.until_turn_ends(timeout=30)
        assert kinds(seen)[-1] == "turn_completed"
        seqs = [event.seq for event in seen]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # none lost, none twice
        assert text_of(seen) == "".join(LONG_ANSWER.chunks)

        # The turn's end reached the session service once it was back: the session takes a new message.
        fake.script(FakeReply(chunks=["Back."]))
        await again.say("are you back?")
        new_turn = await again.until_turn_ends(timeout=10)
        assert text_of(new_turn) == "Back." and {event.turn_id for event in new_turn} != {turn_id}
        again.cancel()


async def test_a_session_its_restarted_memory_store_lost_ends_its_stream_and_keeps_the_partial_answer(
    make_system, caplog
):
    async with FakeOpenAI() as fake:
        system, chat, events = await streaming(make_system, fake, {})
        conversation_id = events[0].session_opened.conversation_id
        with caplog.at_level(logging.INFO, logger="gateway"):
            await system.session.stop(0)
            await restart_session_service(system, {})  # empty: the session is gone
            rest, status = await until_stream_ends(chat, timeout=OUTAGE_SECONDS + 5)
            assert status == grpc.StatusCode.NOT_FOUND
            assert "open a new session" in rest[-1].error.message
            await asyncio.sleep(1)  # what it logs meanwhile, while the answer would still be streaming
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) < 10

        # The answer stopped upstream, and what the client got of it is stored as failed.
        assert await fake.wait_for_disconnects(1, timeout=2)
        stored = await system.history_store.ListMessages(
            history_pb2.ListMessagesRequest(user_id="local", conversation_id=conversation_id)
        )
        assert stored.messages[-1].role == history_pb2.ROLE_ASSISTANT
        assert stored.messages[-1].status == history_pb2.MESSAGE_STATUS_ERROR
        assert stored.messages[-1].content.startswith(text_of(events + rest))

        # A new session works.
        fake.script(FakeReply(chunks=["Fresh."]))
        fresh = ChatStream(system.chat)
        await fresh.open(model="fake-gpt")
        await fresh.say("hello again")
        assert text_of(await fresh.until_turn_ends(timeout=10)) == "Fresh."
        fresh.cancel()
