"""History stops while answers stream: each turn still ends at once, says its answer is saved later, and the
answer is stored, once and whole, when history is back."""

import asyncio
import time

import pytest
from chat_helpers import ChatStream, kinds, text_of

from duplex.chat.v1 import chat_pb2
from duplex.history.v1 import history_pb2
from history_service.server import create_server as create_history
from history_service.settings import HistorySettings
from tests.conftest import System
from tests.fake_openai import FakeOpenAI, FakeReply

pytestmark = pytest.mark.timeout(120)

ANSWER = FakeReply(chunks=[f" Sentence {n}." for n in range(40)], pace=0.03)
STORE_TIMEOUT = 1.0


async def restart_history(system: System, data_dir) -> None:
    """History again, on the same port and the same database."""
    system.history = await create_history(HistorySettings(
        history_listen=f"127.0.0.1:{system.history.port}", data_dir=data_dir, llm_target=f"127.0.0.1:{system.llm.port}"
    ))


async def stored_answers(system: System, conversation_id: str) -> list[history_pb2.Message]:
    reply = await system.history_store.ListMessages(
        history_pb2.ListMessagesRequest(user_id="local", conversation_id=conversation_id)
    )
    return [message for message in reply.messages if message.role == history_pb2.ROLE_ASSISTANT]


async def eventually_stored(system: System, conversation_id: str, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while not (answers := await stored_answers(system, conversation_id)):
        assert time.monotonic() < deadline, "the answer was never stored"
        await asyncio.sleep(0.1)
    return answers


async def answering(make_system, fake: FakeOpenAI) -> tuple[System, ChatStream, str, list]:
    system = await make_system(
        llm_overrides={"llm_models": [{"name": "fake-gpt", "base_url": fake.base_url}]},
        answer_store_timeout_seconds=STORE_TIMEOUT,
    )
    fake.script(ANSWER)
    chat = ChatStream(system.chat)
    opened = await chat.open(model="fake-gpt")
    await chat.say("tell me something")
    events = await chat.until("delta")
    return system, chat, opened.session_opened.conversation_id, events


async def test_an_answer_that_ends_while_history_is_down_is_saved_once_it_is_back(make_system, tmp_path):
    async with FakeOpenAI() as fake:
        system, chat, conversation_id, events = await answering(make_system, fake)
        await system.history.stop(0)
        events += await chat.until_turn_ends(timeout=15)
        ended_after = events[-1].time.ToNanoseconds() / 1e9 - events[-2].time.ToNanoseconds() / 1e9
        assert kinds(events)[-1] == "turn_completed", events[-1]
        completed = events[-1].turn_completed
        assert completed.saved_later and not completed.assistant_message_id
        assert ended_after < STORE_TIMEOUT + 1  # told at once, not after a long wait

        await restart_history(system, tmp_path / "data0")
        [answer] = await eventually_stored(system, conversation_id)
        assert answer.content == text_of(events) == "".join(ANSWER.chunks)
        assert answer.status == history_pb2.MESSAGE_STATUS_COMPLETE

        # The session goes on, and the next turn's context holds the saved answer.
        fake.script(FakeReply(chunks=["And more."]))
        await chat.say("go on")
        assert kinds(await chat.until_turn_ends(timeout=10))[-1] == "turn_completed"
        assert fake.requests[-1].body["messages"][-2] == {"role": "assistant", "content": answer.content}
        chat.cancel()


async def test_a_cancelled_answer_while_history_is_down_keeps_its_partial_text(make_system, tmp_path):
    async with FakeOpenAI() as fake:
        system, chat, conversation_id, events = await answering(make_system, fake)
        await system.history.stop(0)
        await chat.send(cancel=chat_pb2.Cancel())
        events += await chat.until_turn_ends(timeout=15)
        cancelled = events[-1].turn_cancelled
        assert kinds(events)[-1] == "turn_cancelled" and cancelled.saved_later

        await restart_history(system, tmp_path / "data0")
        [answer] = await eventually_stored(system, conversation_id)
        assert answer.content == text_of(events) and answer.status == history_pb2.MESSAGE_STATUS_CANCELLED
        chat.cancel()
