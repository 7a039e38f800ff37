"""What the model sees: the conversation's stored messages turned into llm messages."""

import json
from collections import deque

from duplex.history.v1 import history_pb2
from duplex.llm.v1 import llm_pb2
from gateway.clients import HistoryClient


class ConversationContext:
    """The most recent messages of a conversation (tool rounds kept whole) and its first user message."""

    def __init__(self, messages: list[llm_pb2.Message], first_user_text: str):
        self.messages = messages
        self.first_user_text = first_user_text

    @classmethod
    async def load(cls, history: HistoryClient, user_id: str, conversation_id: str, limit: int):
        recent: deque[history_pb2.Message] = deque(maxlen=limit)
        first_user_text = ""
        page_token = ""
        while True:
            page = await history.list_messages(user_id, conversation_id, page_token)
            if not first_user_text:
                first_user_text = next((m.content for m in page.messages if m.role == history_pb2.ROLE_USER), "")
            recent.extend(page.messages)
            page_token = page.next_page_token
            if not page_token:
                break
        return cls(_well_formed([to_llm_message(m) for m in recent if _visible(m)]), first_user_text)


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
