"""duplex.chat.v1.ConversationService: the user's own conversations, search, export and usage.

Every call acts for the authenticated user only; history_service answers NOT_FOUND for anyone else's ids.
"""

from duplex.chat.v1 import chat_pb2, conversation_pb2, conversation_pb2_grpc
from duplex.history.v1 import history_pb2
from gateway.auth import Authenticator
from gateway.clients import HistoryClient

_ROLES = {
    history_pb2.ROLE_USER: conversation_pb2.MESSAGE_ROLE_USER,
    history_pb2.ROLE_ASSISTANT: conversation_pb2.MESSAGE_ROLE_ASSISTANT,
    history_pb2.ROLE_TOOL: conversation_pb2.MESSAGE_ROLE_TOOL,
}
_EXPORT_FORMATS = {
    conversation_pb2.EXPORT_FORMAT_UNSPECIFIED: history_pb2.EXPORT_FORMAT_JSON,
    conversation_pb2.EXPORT_FORMAT_JSON: history_pb2.EXPORT_FORMAT_JSON,
    conversation_pb2.EXPORT_FORMAT_MARKDOWN: history_pb2.EXPORT_FORMAT_MARKDOWN,
}


def public_conversation(stored: history_pb2.Conversation) -> conversation_pb2.Conversation:
    return conversation_pb2.Conversation(
        conversation_id=stored.conversation_id, title=stored.title, created_at=stored.created_at,
        updated_at=stored.updated_at, message_count=stored.message_count,
    )


def public_message(stored: history_pb2.Message) -> conversation_pb2.Message:
    # The history service's status numbers are the public ones.
    return conversation_pb2.Message(
        message_id=stored.message_id, role=_ROLES.get(stored.role, conversation_pb2.MESSAGE_ROLE_UNSPECIFIED),
        content=stored.content, status=stored.status, client_message_id=stored.client_message_id,
        model=stored.model, tool_calls_json=stored.tool_calls_json, tool_name=stored.tool_name,
        usage=chat_pb2.Usage(prompt_tokens=stored.prompt_tokens, completion_tokens=stored.completion_tokens),
        created_at=stored.created_at,
    )


class ConversationServicer(conversation_pb2_grpc.ConversationServiceServicer):
    def __init__(self, history: HistoryClient, identity: Authenticator):
        self._history = history
        self._identity = identity

    async def ListConversations(self, request, context):
        page = await self._history.list_conversations(
            self._identity.user_id(context), request.page_size, request.page_token
        )
        return conversation_pb2.ListConversationsResponse(
            conversations=[public_conversation(c) for c in page.conversations], next_page_token=page.next_page_token
        )

    async def GetConversation(self, request, context):
        user_id = self._identity.user_id(context)
        conversation = await self._history.get_conversation(user_id, request.conversation_id)
        page = await self._history.list_messages(
            user_id, request.conversation_id, request.page_token, request.page_size
        )
        return conversation_pb2.GetConversationResponse(
            conversation=public_conversation(conversation), messages=[public_message(m) for m in page.messages],
            next_page_token=page.next_page_token,
        )

    async def RenameConversation(self, request, context):
        renamed = await self._history.rename_conversation(
            self._identity.user_id(context), request.conversation_id, request.title
        )
        return conversation_pb2.RenameConversationResponse(conversation=public_conversation(renamed))

    async def DeleteConversation(self, request, context):
        await self._history.delete_conversation(self._identity.user_id(context), request.conversation_id)
        return conversation_pb2.DeleteConversationResponse()

    async def SearchMessages(self, request, context):
        page = await self._history.search_messages(
            self._identity.user_id(context), request.query, request.page_size, request.page_token
        )
        hits = [
            conversation_pb2.SearchHit(
                conversation_id=hit.message.conversation_id, conversation_title=hit.conversation_title,
                message=public_message(hit.message), snippet=hit.snippet,
            )
            for hit in page.hits
        ]
        return conversation_pb2.SearchMessagesResponse(hits=hits, next_page_token=page.next_page_token)

    async def ExportConversation(self, request, context):
        export_format = _EXPORT_FORMATS.get(request.format, history_pb2.EXPORT_FORMAT_JSON)
        exported = await self._history.export_conversation(
            self._identity.user_id(context), request.conversation_id, export_format
        )
        return conversation_pb2.ExportConversationResponse(
            content=exported.content, content_type=exported.content_type, filename=exported.filename
        )

    async def GetUsage(self, request, context):
        records = await self._history.get_usage(self._identity.user_id(context), request.from_day, request.to_day)
        return conversation_pb2.GetUsageResponse(
            records=[
                conversation_pb2.UsageRecord(
                    day=r.day, model=r.model, prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens, messages=r.messages,
                )
                for r in records
            ]
        )
