"""duplex.history.v1.HistoryService over gRPC: request validation and proto conversion, nothing else."""

from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from duplex.common.errors import InvalidArgument
from duplex.history.v1 import history_pb2, history_pb2_grpc
from history_service import page_tokens
from history_service.domain import Conversation, Message, MessageStatus, NewMessage, Role
from history_service.repository import HistoryRepository

SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name

DEFAULT_TITLE = "New conversation"
MAX_TITLE_CHARS = 200
MAX_CONTENT_CHARS = 100_000
# The column width for user ids, client message ids and model names.
MAX_KEY_CHARS = 255
DEFAULT_CONVERSATION_PAGE_SIZE = 50
MAX_CONVERSATION_PAGE_SIZE = 200
DEFAULT_MESSAGE_PAGE_SIZE = 100
MAX_MESSAGE_PAGE_SIZE = 1000

ROLE_FROM_PROTO = {
    history_pb2.ROLE_SYSTEM: Role.SYSTEM,
    history_pb2.ROLE_USER: Role.USER,
    history_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
}
ROLE_TO_PROTO = {role: value for value, role in ROLE_FROM_PROTO.items()}
STATUS_FROM_PROTO = {
    history_pb2.MESSAGE_STATUS_UNSPECIFIED: MessageStatus.COMPLETE,
    history_pb2.MESSAGE_STATUS_COMPLETE: MessageStatus.COMPLETE,
    history_pb2.MESSAGE_STATUS_CANCELLED: MessageStatus.CANCELLED,
    history_pb2.MESSAGE_STATUS_INTERRUPTED: MessageStatus.INTERRUPTED,
    history_pb2.MESSAGE_STATUS_ERROR: MessageStatus.ERROR,
}
STATUS_TO_PROTO = {
    MessageStatus.COMPLETE: history_pb2.MESSAGE_STATUS_COMPLETE,
    MessageStatus.CANCELLED: history_pb2.MESSAGE_STATUS_CANCELLED,
    MessageStatus.INTERRUPTED: history_pb2.MESSAGE_STATUS_INTERRUPTED,
    MessageStatus.ERROR: history_pb2.MESSAGE_STATUS_ERROR,
}


class HistoryServicer(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, repository: HistoryRepository):
        self._repository = repository

    async def CreateConversation(
        self, request: history_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.CreateConversationResponse:
        user_id = require_user_id(request.user_id)
        conversation = await self._repository.create_conversation(user_id, clean_title(request.title))
        return history_pb2.CreateConversationResponse(conversation=conversation_to_proto(conversation))

    async def GetConversation(
        self, request: history_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.GetConversationResponse:
        user_id = require_user_id(request.user_id)
        conversation = await self._repository.get_conversation(user_id, request.conversation_id)
        return history_pb2.GetConversationResponse(conversation=conversation_to_proto(conversation))

    async def ListConversations(
        self, request: history_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListConversationsResponse:
        user_id = require_user_id(request.user_id)
        limit = page_size(request.page_size, DEFAULT_CONVERSATION_PAGE_SIZE, MAX_CONVERSATION_PAGE_SIZE)
        after = page_tokens.decode_conversation_token(request.page_token)
        page = await self._repository.list_conversations(user_id, limit, after)
        return history_pb2.ListConversationsResponse(
            conversations=[conversation_to_proto(conversation) for conversation in page.conversations],
            next_page_token=page_tokens.encode_conversation_token(page.next_cursor) if page.next_cursor else "",
        )

    async def DeleteConversation(
        self, request: history_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.DeleteConversationResponse:
        user_id = require_user_id(request.user_id)
        await self._repository.delete_conversation(user_id, request.conversation_id)
        return history_pb2.DeleteConversationResponse()

    async def AppendMessage(
        self, request: history_pb2.AppendMessageRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.AppendMessageResponse:
        user_id = require_user_id(request.user_id)
        result = await self._repository.append_message(user_id, new_message_from_request(request))
        return history_pb2.AppendMessageResponse(message=message_to_proto(result.message), duplicate=result.duplicate)

    async def ListMessages(
        self, request: history_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListMessagesResponse:
        user_id = require_user_id(request.user_id)
        limit = page_size(request.page_size, DEFAULT_MESSAGE_PAGE_SIZE, MAX_MESSAGE_PAGE_SIZE)
        after_pk = page_tokens.decode_message_token(request.page_token)
        page = await self._repository.list_messages(user_id, request.conversation_id, limit, after_pk)
        next_token = page_tokens.encode_message_token(page.next_after_pk) if page.next_after_pk is not None else ""
        return history_pb2.ListMessagesResponse(
            messages=[message_to_proto(message) for message in page.messages], next_page_token=next_token
        )


def require_user_id(user_id: str) -> str:
    if not user_id:
        raise InvalidArgument("user_id is required")
    return limit_chars(user_id, MAX_KEY_CHARS, "user_id")


def limit_chars(value: str, max_chars: int, field: str) -> str:
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is longer than {max_chars} characters")
    return value


def clean_title(title: str) -> str:
    return limit_chars(title.strip(), MAX_TITLE_CHARS, "title") or DEFAULT_TITLE


def page_size(requested: int, default: int, maximum: int) -> int:
    # Too large is clamped rather than refused, so clients can ask for "as many as you allow".
    return min(requested or default, maximum)


def new_message_from_request(request: history_pb2.AppendMessageRequest) -> NewMessage:
    role = ROLE_FROM_PROTO.get(request.role)
    if role is None:
        raise InvalidArgument("role must be ROLE_USER, ROLE_ASSISTANT or ROLE_SYSTEM")
    status = STATUS_FROM_PROTO.get(request.status)
    if status is None:
        raise InvalidArgument("unknown message status")
    return NewMessage(
        conversation_id=request.conversation_id,
        role=role,
        content=limit_chars(request.content, MAX_CONTENT_CHARS, "content"),
        status=status,
        client_message_id=limit_chars(request.client_message_id, MAX_KEY_CHARS, "client_message_id") or None,
        model=limit_chars(request.model, MAX_KEY_CHARS, "model"),
        prompt_tokens=request.prompt_tokens,
        completion_tokens=request.completion_tokens,
    )


def conversation_to_proto(conversation: Conversation) -> history_pb2.Conversation:
    return history_pb2.Conversation(
        conversation_id=conversation.id,
        user_id=conversation.user_id,
        title=conversation.title,
        created_at=timestamp(conversation.created_at),
        updated_at=timestamp(conversation.updated_at),
        message_count=conversation.message_count,
    )


def message_to_proto(message: Message) -> history_pb2.Message:
    return history_pb2.Message(
        message_id=message.id,
        conversation_id=message.conversation_id,
        role=ROLE_TO_PROTO[message.role],
        content=message.content,
        status=STATUS_TO_PROTO[message.status],
        client_message_id=message.client_message_id or "",
        model=message.model,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        created_at=timestamp(message.created_at),
    )


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
