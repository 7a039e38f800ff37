"""What the model sees: the conversation's stored messages turned into llm messages."""

import json
from collections import deque

from duplex.history.v1 import history_pb2
from duplex.llm.v1 import llm_pb2
from gateway.clients import HistoryClient

# How many of a conversation's first messages are searched for its first user message.
FIRST_MESSAGES = 10


class ConversationContext:
    """The most recent stored messages of a conversation (what the model sees) and its first user message.

    A session's hub keeps its context between turns and `record`s every message the turn stores, so a
    turn does not read the conversation back. The conversation's message count, returned by each append,
    says whether the copy is still whole: anything stored elsewhere in between makes it stale.
    """

    def __init__(self, limit: int, stored: list[history_pb2.Message], first_user_text: str, message_count: int):
        self._recent: deque[history_pb2.Message] = deque(stored, maxlen=limit)
        self.first_user_text = first_user_text
        self.message_count = message_count  # the conversation's count this copy reflects; -1 when unknown

    @classmethod
    def empty(cls, limit: int) -> "ConversationContext":
        return cls(limit, [], "", message_count=0)

    @classmethod
    async def load(cls, history: HistoryClient, user_id: str, conversation_id: str, limit: int):
        """The last `limit` messages in one call; the first user message from the start when older."""
        page = await history.list_messages(user_id, conversation_id, page_size=limit, newest_first=True)
        recent = list(reversed(page.messages))
        if page.next_page_token:  # the window does not reach back to the conversation's start
            recent_start = await history.list_messages(user_id, conversation_id, page_size=FIRST_MESSAGES)
            first_user_text = _first_user_text(recent_start.messages)
        else:
            first_user_text = _first_user_text(recent)
        return cls(limit, recent, first_user_text, message_count=-1)

    def record(self, stored: history_pb2.AppendMessageResponse) -> bool:
        """Add a message this replica just stored; False (and nothing added) when the copy is stale."""
        if stored.duplicate or stored.conversation_message_count != self.message_count + 1:
            return False
        self._add(stored.message)
        self.message_count = stored.conversation_message_count
        return True

    def with_message(self, message: history_pb2.Message) -> "ConversationContext":
        """A copy with `message` added: what the context will be once it is stored, if nothing else is."""
        ahead = ConversationContext(self._recent.maxlen, list(self._recent), self.first_user_text, self.message_count)
        ahead._add(message)
        return ahead

    def _add(self, message: history_pb2.Message) -> None:
        self._recent.append(message)
        self.first_user_text = self.first_user_text or _first_user_text([message])

    def counted_at(self, stored: history_pb2.AppendMessageResponse) -> None:
        """A fresh load ending with `stored` reflects the conversation as of that append."""
        if self._recent and self._recent[-1].message_id == stored.message.message_id:
            self.message_count = stored.conversation_message_count

    @property
    def messages(self) -> list[llm_pb2.Message]:
        return _well_formed([to_llm_message(m) for m in self._recent if _visible(m)])


def _first_user_text(messages) -> str:
    return next((m.content for m in messages if m.role == history_pb2.ROLE_USER), "")


def _visible(message: history_pb2.Message) -> bool:
    if message.role == history_pb2.ROLE_ASSISTANT:
        return bool(message.content or message.tool_calls_json)
    return message.role in (history_pb2.ROLE_USER, history_pb2.ROLE_TOOL)


def to_llm_message(message: history_pb2.Message) -> llm_pb2.Message:
    if message.role == history_pb2.ROLE_TOOL:
        return llm_pb2.Message(
            role=llm_pb2.ROLE_TOOL, content=message.content, tool_call_id=message.tool_call_id, name=message.tool_name
        )
    if message.role == history_pb2.ROLE_ASSISTANT:
        calls = [llm_pb2.ToolCall(id=c["id"], name=c["name"], arguments_json=c["arguments"])
                 for c in json.loads(message.tool_calls_json or "[]")]
        return llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=message.content, tool_calls=calls)
    return llm_pb2.Message(role=llm_pb2.ROLE_USER, content=message.content)


def tool_calls_json(calls: list[llm_pb2.ToolCall]) -> str:
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments_json} for c in calls])


def _well_formed(messages: list[llm_pb2.Message]) -> list[llm_pb2.Message]:
    """Drop tool rounds that are not whole (cut by the window, or by a cancel during tools): providers
    reject a tool result without its call, and a call without all its results."""
    kept: list[llm_pb2.Message] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        if message.role == llm_pb2.ROLE_TOOL:
            index += 1  # a result whose call is not in the window
            continue
        if message.role == llm_pb2.ROLE_ASSISTANT and message.tool_calls:
            wanted = {call.id for call in message.tool_calls}
            results = []
            index += 1
            while index < len(messages) and messages[index].role == llm_pb2.ROLE_TOOL:
                results.append(messages[index])
                index += 1
            if {result.tool_call_id for result in results} == wanted:
                kept += [message, *results]
            elif message.content:
                kept.append(llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=message.content))
            continue
        kept.append(message)
        index += 1
    return kept
