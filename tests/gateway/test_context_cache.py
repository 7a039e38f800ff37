"""A session keeps its conversation between turns instead of reading it back from history each turn,
and reads it back whenever something else was stored in the conversation meanwhile."""

from chat_helpers import ChatStream, text_of

from duplex.history.v1 import history_pb2
from gateway import turn as turn_module
from gateway.clients import LlmClient
from gateway.context import ConversationContext


def stored(count: int, role=history_pb2.ROLE_USER, text="hi", duplicate=False) -> history_pb2.AppendMessageResponse:
    message = history_pb2.Message(message_id=f"m{count}", role=role, content=text)
    return history_pb2.AppendMessageResponse(message=message, conversation_message_count=count, duplicate=duplicate)


def test_a_context_takes_only_the_next_message_of_the_conversation():
    context = ConversationContext(limit=3, stored=[], first_user_text="", message_count=0)
    assert context.record(stored(1, text="first"))
    assert context.record(stored(2, role=history_pb2.ROLE_ASSISTANT, text="answer"))
    assert not context.record(stored(4))  # message 3 was stored by someone else
    assert not context.record(stored(3, duplicate=True))  # already stored once, so not new
    assert context.record(stored(3, text="second"))
    assert context.record(stored(4, text="third"))
    assert [m.content for m in context.messages] == ["answer", "second", "third"]  # the window
    assert context.first_user_text == "first"


def test_a_fresh_load_knows_its_count_only_when_it_ends_with_the_turns_own_message():
    mine = stored(5)
    context = ConversationContext(limit=10, stored=[mine.message], first_user_text="", message_count=-1)
    context.counted_at(stored(6))  # not the newest message: the count stays unknown
    assert context.message_count == -1
    context.counted_at(mine)
    assert context.message_count == 5


async def test_turns_read_the_conversation_back_only_when_the_session_starts_on_an_existing_one(system, monkeypatch):
    loads = []
    original = ConversationContext.load

    async def counting_load(*args, **kwargs):
        loads.append(args)
        return await original(*args, **kwargs)

    monkeypatch.setattr(turn_module.ConversationContext, "load", counting_load)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    for number in range(3):
        await chat.say(f"message {number}")
        answer = text_of(await chat.until_turn_ends())
    assert loads == []  # a new conversation is known to be empty
    assert "You have sent 3 messages" in answer

    later = ChatStream(system.chat)
    await later.open(conversation_id=opened.session_opened.conversation_id)
    for number in range(2):
        await later.say(f"later message {number}")
        answer = text_of(await later.until_turn_ends())
    assert len(loads) == 1
    assert "You have sent 5 messages" in answer


async def test_the_model_is_asked_once_per_turn_and_an_early_ask_for_a_duplicate_is_cancelled(system, monkeypatch):
    generations = []
    original = LlmClient.generate

    def recording_generate(self, request, timeout):
        generations.append(original(self, request, timeout))
        return generations[-1]

    monkeypatch.setattr(LlmClient, "generate", recording_generate)
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("hello", client_message_id="same")
    await chat.until_turn_ends()
    assert len(generations) == 1

    await chat.say("hello", client_message_id="same")  # a resend: acknowledged, not answered again
    accepted = await chat.until("message_accepted")
    assert accepted[-1].message_accepted.duplicate
    assert len(generations) == 2  # asked before the store said "duplicate"...
    assert generations[-1].cancelled()  # ...and called off before the duplicate was acknowledged


async def test_a_message_stored_by_another_session_is_in_the_next_turns_context(system):
    first = ChatStream(system.chat)
    opened = await first.open()
    await first.say("one")
    await first.until_turn_ends()

    other = ChatStream(system.chat)  # a second tab on the same conversation
    await other.open(conversation_id=opened.session_opened.conversation_id)
    await other.say("two")
    assert "You have sent 2 messages" in text_of(await other.until_turn_ends())

    await first.say("three")
    assert "You have sent 3 messages" in text_of(await first.until_turn_ends())


async def test_a_long_conversation_is_read_back_as_its_window(make_system):
    system = await make_system(context_messages=3, tokens_per_second=0)
    first = ChatStream(system.chat)
    opened = await first.open()
    for text in ("a", "b", "c"):
        await first.say(text)
        await first.until_turn_ends()

    later = ChatStream(system.chat)  # a new session: reads the conversation back
    await later.open(conversation_id=opened.session_opened.conversation_id)
    await later.say("d")
    answer = text_of(await later.until_turn_ends())
    # The window is 3 messages ("c", its answer, "d"): the demo model sees 2 user messages, from "c".
    assert "You have sent 2 messages" in answer and 'Your first one was: "c"' in answer


class PagedHistory:
    """Just enough of HistoryClient for ConversationContext.load: messages m0..m{n-1}, every third a user's."""

    def __init__(self, count: int):
        roles = [history_pb2.ROLE_USER, history_pb2.ROLE_ASSISTANT, history_pb2.ROLE_ASSISTANT]
        self.messages = [history_pb2.Message(message_id=f"m{i}", role=roles[i % 3], content=f"text {i}")
                         for i in range(count)]
        self.calls = []

    async def list_messages(self, user_id, conversation_id, page_token="", page_size=1000, newest_first=False):
        self.calls.append((page_size, newest_first))
        ordered = self.messages[::-1] if newest_first else self.messages
        return history_pb2.ListMessagesResponse(
            messages=ordered[:page_size], next_page_token="more" if len(ordered) > page_size else "")


async def test_loading_reads_the_window_newest_first_and_the_first_user_message_from_the_start():
    history = PagedHistory(count=30)
    context = await ConversationContext.load(history, "u", "c", limit=4)
    assert [m.content for m in context.messages] == ["text 26", "text 27", "text 28", "text 29"]
    assert context.first_user_text == "text 0"
    assert history.calls == [(4, True), (10, False)]

    short = PagedHistory(count=3)
    context = await ConversationContext.load(short, "u", "c", limit=4)
    assert context.first_user_text == "text 0" and short.calls == [(4, True)]  # one call when it all fits
