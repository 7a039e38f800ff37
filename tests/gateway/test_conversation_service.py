"""The conversation API at the gateway, for the caller's own conversations."""

import grpc
import pytest
from chat_helpers import collect, kinds

from duplex.chat.v1 import chat_pb2, conversation_pb2, conversation_pb2_grpc


async def test_list_title_search_export_usage_rename_and_delete(system):
    events = await collect(system.chat.SendMessage(chat_pb2.SendMessageRequest(
        message=chat_pb2.UserMessage(text="Plan a weekend trip to Lisbon with museums and pastries"))))
    assert kinds(events)[-1] == "turn_completed"
    conversation_id = events[0].session_opened.conversation_id
    api = conversation_pb2_grpc.ConversationServiceStub(system.channel(system.gateway))

    listed = await api.ListConversations(conversation_pb2.ListConversationsRequest())
    [conversation] = listed.conversations
    assert conversation.title == "Plan a weekend trip to Lisbon with museums and pastries"  # after turn one
    assert conversation.message_count == 2

    got = await api.GetConversation(conversation_pb2.GetConversationRequest(conversation_id=conversation_id))
    assert [m.role for m in got.messages] == [conversation_pb2.MESSAGE_ROLE_USER,
                                              conversation_pb2.MESSAGE_ROLE_ASSISTANT]
    assert got.messages[1].usage.completion_tokens == events[-1].turn_completed.usage.completion_tokens

    found = await api.SearchMessages(conversation_pb2.SearchMessagesRequest(query="Lisbon"))
    assert found.hits and found.hits[0].conversation_id == conversation_id

    markdown = await api.ExportConversation(conversation_pb2.ExportConversationRequest(
        conversation_id=conversation_id, format=conversation_pb2.EXPORT_FORMAT_MARKDOWN))
    assert "Lisbon" in markdown.content and markdown.content_type.startswith("text/markdown")

    usage = await api.GetUsage(conversation_pb2.GetUsageRequest())
    assert sum(r.completion_tokens for r in usage.records) == events[-1].turn_completed.usage.completion_tokens

    renamed = await api.RenameConversation(
        conversation_pb2.RenameConversationRequest(conversation_id=conversation_id, title="Lisbon"))
    assert renamed.conversation.title == "Lisbon"
    await api.DeleteConversation(conversation_pb2.DeleteConversationRequest(conversation_id=conversation_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.GetConversation(conversation_pb2.GetConversationRequest(conversation_id=conversation_id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
