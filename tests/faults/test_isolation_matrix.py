"""Per-user isolation, every RPC: with authentication on, user B calls each ChatService and ConversationService
method (taken from the service descriptors, so a new RPC cannot be left out) naming user A's session,
conversation, turn and message ids, and Chat stream requests that name A's session or turn. Each answers
NOT_FOUND (not PERMISSION_DENIED, which would say the id exists) or, where B names nothing of A's, shows B
only B's data; nothing B receives holds A's text, and A's running turn and stored data come out untouched."""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from pydantic import SecretStr

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from gateway.auth import mint_token
from gateway.settings import GatewaySettings
from tests.faults.load_clients import text_of
from tests.gateway.chat_helpers import ChatStream

pytestmark = pytest.mark.timeout(60)

SECRET = "isolation-matrix-secret-long-enough-for-hs256"
TOKENS_PER_SECOND = 10  # ~50-token answers take ~5 s: A's second turn runs while B tries everything
ALICE_WORD = "zanzibarquokka"  # in A's messages (and so in the demo's answers, which quote them), nowhere else
BOB_WORD = "tasmanianwombat"
SHARED_CLIENT_MESSAGE_ID = "the-same-client-id"
TIMEOUT = 15.0


def method_names(module, service: str) -> set[tuple[str, str]]:
    return {(service, method.name) for method in module.DESCRIPTOR.services_by_name[service].methods}


PUBLIC_METHODS = method_names(chat_pb2, "ChatService") | method_names(conversation_pb2, "ConversationService")


@dataclass
class User:
    name: str
    chat: chat_pb2_grpc.ChatServiceStub
    conversations: conversation_pb2_grpc.ConversationServiceStub
    metadata: tuple

    def stream(self) -> ChatStream:
        return ChatStream(self.chat, metadata=self.metadata)


@dataclass
class Turn:
    session_id: str
    conversation_id: str
    turn_id: str
    message_id: str
    stream: ChatStream
    events: list[chat_pb2.ChatEvent]


async def start_turn(user: User, text: str, client_message_id: str | None = None) -> Turn:
    """A new session whose turn answering `text` has started streaming."""
    stream = user.stream()
    opened = (await stream.open()).session_opened
    await stream.say(text, client_message_id)
    events = await stream.until("delta", timeout=TIMEOUT)
    accepted = next(e for e in events if e.WhichOneof("kind") == "message_accepted")
    assert not accepted.message_accepted.duplicate, accepted
    return Turn(opened.session_id, opened.conversation_id, accepted.turn_id, accepted.message_accepted.message_id,
                stream, events)


async def finish(turn: Turn) -> chat_pb2.ChatEvent:
    turn.events += await turn.stream.until_turn_ends(timeout=TIMEOUT)
    turn.stream.cancel()
    return turn.events[-1]


@dataclass
class Case:
    """One call B makes, and what must come of it."""

    method: tuple[str, str]
    what: str
    run: Callable[[], Awaitable[str | None]]  # None when it held, else what went wrong


class Matrix:
    """B's calls, run one after another; everything B receives is kept to be searched for A's text."""

    def __init__(self):
        self.cases: list[Case] = []
        self.received: list[bytes] = []

    def add(self, service: str, method: str, what: str, run: Callable[[], Awaitable[str | None]]) -> None:
        self.cases.append(Case((service, method), what, run))

    def not_found(self, service: str, method: str, what: str, call: Callable[[], Awaitable]) -> None:
        async def run() -> str | None:
            try:
                answer = await call()
            except grpc.aio.AioRpcError as error:
                self.received.append((error.details() or "").encode())
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    return f"{error.code().name}: {error.details()}"
                return None
            self.received += [answer.SerializeToString()] if hasattr(answer, "SerializeToString") else [
                item.SerializeToString() for item in answer
            ]
            return f"answered instead of NOT_FOUND: {answer}"

        self.add(service, method, what, run)

    async def run(self) -> list[str]:
        failures = []
        for case in self.cases:
            problem = await case.run()
            if problem is not None:
                failures.append(f"{case.method[1]} ({case.what}): {problem}")
        return failures


async def stream_replies(user: User, received: list[bytes], *requests: dict) -> list[chat_pb2.ChatEvent]:
    """Send `requests` on a new Chat stream, then a ping; the events that came before the pong."""
    stream = user.stream()
    try:
        for request in requests:
            await stream.send(**request)
        await stream.send(ping=chat_pb2.Ping(nonce="end"))
        events = []
        while (event := await stream.next_event(TIMEOUT)).WhichOneof("kind") != "pong":
            events.append(event)
        received += [event.SerializeToString() for event in events]
        return events
    finally:
        stream.cancel()


def kinds_and_codes(events: list[chat_pb2.ChatEvent]) -> list[tuple[str, int]]:
    return [(event.WhichOneof("kind"), event.error.code) for event in events]


NOT_FOUND_EVENT = ("error", grpc.StatusCode.NOT_FOUND.value[0])


async def collect(call) -> list:
    """A server-streaming call's messages (AioRpcError when it fails)."""
    return [message async for message in call]


async def test_user_b_gets_not_found_or_only_their_own_data_from_every_rpc(make_system):
    system = await make_system(tokens_per_second=TOKENS_PER_SECOND, jwt_secret=SecretStr(SECRET))
    settings = GatewaySettings(jwt_secret=SecretStr(SECRET))
    channel = system.channel(system.gateway)
    alice, bob = (
        User(name, chat_pb2_grpc.ChatServiceStub(channel), conversation_pb2_grpc.ConversationServiceStub(channel),
             (("authorization", f"Bearer {mint_token(settings, name, 300)}"),))
        for name in ("alice", "bob")
    )

    # A's first turn and B's, at once; B's message reuses the client message id A's was stored under.
    first = await start_turn(alice, f"alice's plan: {ALICE_WORD}", SHARED_CLIENT_MESSAGE_ID)
    own = await start_turn(bob, f"bob's notes: {BOB_WORD}", SHARED_CLIENT_MESSAGE_ID)
    assert own.message_id != first.message_id  # idempotency keys are per conversation, not global
    assert [(await finish(turn)).WhichOneof("kind") for turn in (first, own)] == ["turn_completed"] * 2
    # A's second conversation, its turn answering while B tries everything below.
    running = await start_turn(alice, f"alice again: {ALICE_WORD}")
    alice_pages = await alice.conversations.ListConversations(
        conversation_pb2.ListConversationsRequest(page_size=1), metadata=alice.metadata
    )
    alice_messages = await alice.conversations.GetConversation(
        conversation_pb2.GetConversationRequest(conversation_id=first.conversation_id, page_size=1),
        metadata=alice.metadata,
    )
    alice_search = await alice.conversations.SearchMessages(
        conversation_pb2.SearchMessagesRequest(query=ALICE_WORD, page_size=1), metadata=alice.metadata
    )
    assert alice_pages.next_page_token and alice_messages.next_page_token and alice_search.next_page_token
    alice_usage = await alice.conversations.GetUsage(conversation_pb2.GetUsageRequest(), metadata=alice.metadata)
    assert alice_usage.records

    m = Matrix()
    b = bob.metadata
    foreign_session, foreign_conversation, foreign_turn = running.session_id, first.conversation_id, running.turn_id
    message = chat_pb2.UserMessage(client_message_id="hijack", text="let me in")

    # -- ChatService
    async def chat_stream_case(requests: list[dict], expected: list[tuple[str, int]]) -> str | None:
        events = await stream_replies(bob, m.received, *requests)
        return None if kinds_and_codes(events) == expected else f"got {events}"

    for what, open_request in [
        ("open A's session", chat_pb2.OpenSession(session_id=foreign_session)),
        ("open A's session resuming after seq 0", chat_pb2.OpenSession(session_id=foreign_session, resume_after_seq=0)),
        ("open A's other session", chat_pb2.OpenSession(session_id=first.session_id, resume_after_seq=0)),
        ("open a session on A's conversation", chat_pb2.OpenSession(conversation_id=foreign_conversation)),
    ]:
        m.add("ChatService", "Chat", what,
              lambda r=open_request: chat_stream_case([{"open": r}, {"message": message}],
                                                      [NOT_FOUND_EVENT, ("error", 9)]))  # 9: open a session first
    m.add("ChatService", "Chat", "on B's session: cancel and interrupt naming A's running turn",
          lambda: chat_stream_case(
              [{"open": chat_pb2.OpenSession(session_id=own.session_id)},
               {"cancel": chat_pb2.Cancel(turn_id=foreign_turn)},
               {"interrupt": chat_pb2.Interrupt(turn_id=foreign_turn, played_ms=10)}],
              [("session_opened", 0)]))
    m.not_found("ChatService", "SendMessage", "A's session", lambda: collect(bob.chat.SendMessage(
        chat_pb2.SendMessageRequest(session_id=foreign_session, message=message), metadata=b)))
    m.not_found("ChatService", "SendMessage", "a new session on A's conversation", lambda: collect(bob.chat.SendMessage(
        chat_pb2.SendMessageRequest(conversation_id=foreign_conversation, message=message), metadata=b)))
    m.not_found("ChatService", "CancelTurn", "A's session", lambda: bob.chat.CancelTurn(
        chat_pb2.CancelTurnRequest(session_id=foreign_session), metadata=b))
    m.not_found("ChatService", "CancelTurn", "A's session and turn", lambda: bob.chat.CancelTurn(
        chat_pb2.CancelTurnRequest(session_id=foreign_session, turn_id=foreign_turn), metadata=b))

    async def cancel_foreign_turn_in_own_session() -> str | None:
        reply = await bob.chat.CancelTurn(
            chat_pb2.CancelTurnRequest(session_id=own.session_id, turn_id=foreign_turn), metadata=b)
        return None if reply.cancelled is False else "B's CancelTurn naming A's turn says it cancelled something"

    m.add("ChatService", "CancelTurn", "B's session, A's running turn", cancel_foreign_turn_in_own_session)
    m.not_found("ChatService", "ResumeStream", "A's session (turn running)", lambda: collect(bob.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=foreign_session), metadata=b)))
    m.not_found("ChatService", "ResumeStream", "A's other session (idle)", lambda: collect(bob.chat.ResumeStream(
        chat_pb2.ResumeStreamRequest(session_id=first.session_id, after_seq=1), metadata=b)))
    m.not_found("ChatService", "CloseSession", "A's session", lambda: bob.chat.CloseSession(
        chat_pb2.CloseSessionRequest(session_id=foreign_session), metadata=b))
    m.not_found("ChatService", "SendAudio", "A's session", lambda: bob.chat.SendAudio(
        chat_pb2.SendAudioRequest(session_id=foreign_session, data=b"\0\0" * 1600, commit=True), metadata=b))
    m.not_found("ChatService", "UpdateSession", "A's session", lambda: bob.chat.UpdateSession(
        chat_pb2.UpdateSessionRequest(session_id=foreign_session, voice=chat_pb2.VoiceOptions(speak_answers=True)),
        metadata=b))

    # -- ConversationService
    for conversation_id in (first.conversation_id, running.conversation_id):
        m.not_found("ConversationService", "GetConversation", "A's conversation", lambda c=conversation_id:
                    bob.conversations.GetConversation(
                        conversation_pb2.GetConversationRequest(conversation_id=c), metadata=b))
        m.not_found("ConversationService", "RenameConversation", "A's conversation", lambda c=conversation_id:
                    bob.conversations.RenameConversation(
                        conversation_pb2.RenameConversationRequest(conversation_id=c, title="bob's now"), metadata=b))
        m.not_found("ConversationService", "ExportConversation", "A's conversation", lambda c=conversation_id:
                    bob.conversations.ExportConversation(
                        conversation_pb2.ExportConversationRequest(conversation_id=c), metadata=b))
        m.not_found("ConversationService", "DeleteConversation", "A's conversation", lambda c=conversation_id:
                    bob.conversations.DeleteConversation(
                        conversation_pb2.DeleteConversationRequest(conversation_id=c), metadata=b))

    async def only_bobs(call: Awaitable, ids_of: Callable, what: str) -> str | None:
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:  # a page token B did not get may be refused, never followed
            m.received.append((error.details() or "").encode())
            return None if error.code() == grpc.StatusCode.INVALID_ARGUMENT else f"{error.code().name}"
        m.received.append(reply.SerializeToString())
        ids = ids_of(reply)
        return None if ids <= {own.conversation_id} else f"{what}: {ids}"

    def conversation_ids(reply) -> set[str]:
        return {c.conversation_id for c in reply.conversations}

    def hit_conversations(reply) -> set[str]:
        return {hit.conversation_id for hit in reply.hits}

    async def lists_only_bobs() -> str | None:
        reply = await bob.conversations.ListConversations(conversation_pb2.ListConversationsRequest(), metadata=b)
        m.received.append(reply.SerializeToString())
        return None if conversation_ids(reply) == {own.conversation_id} else f"listed {reply}"

    m.add("ConversationService", "ListConversations", "no ids: B's conversations only", lambda: lists_only_bobs())
    m.add("ConversationService", "ListConversations", "A's page token", lambda: only_bobs(
        bob.conversations.ListConversations(
            conversation_pb2.ListConversationsRequest(page_token=alice_pages.next_page_token), metadata=b),
        conversation_ids, "listed"))

    async def own_conversation_with_alices_page_token() -> str | None:
        try:
            reply = await bob.conversations.GetConversation(conversation_pb2.GetConversationRequest(
                conversation_id=own.conversation_id, page_token=alice_messages.next_page_token), metadata=b)
        except grpc.aio.AioRpcError as error:
            return None if error.code() == grpc.StatusCode.INVALID_ARGUMENT else error.code().name
        m.received.append(reply.SerializeToString())
        return None if reply.conversation.conversation_id == own.conversation_id else f"got {reply.conversation}"

    m.add("ConversationService", "GetConversation", "B's conversation with A's page token",
          own_conversation_with_alices_page_token)

    async def searches_only_bobs() -> str | None:
        theirs = await bob.conversations.SearchMessages(
            conversation_pb2.SearchMessagesRequest(query=ALICE_WORD), metadata=b)
        mine = await bob.conversations.SearchMessages(
            conversation_pb2.SearchMessagesRequest(query=BOB_WORD), metadata=b)
        m.received += [theirs.SerializeToString(), mine.SerializeToString()]
        if list(theirs.hits):
            return f"A's messages found: {theirs.hits}"
        return None if hit_conversations(mine) == {own.conversation_id} else f"B's own search found {mine.hits}"

    m.add("ConversationService", "SearchMessages", "A's word finds nothing, B's finds B's", searches_only_bobs)
    m.add("ConversationService", "SearchMessages", "A's page token", lambda: only_bobs(
        bob.conversations.SearchMessages(
            conversation_pb2.SearchMessagesRequest(query=ALICE_WORD, page_token=alice_search.next_page_token),
            metadata=b),
        hit_conversations, "found"))

    async def usage_is_bobs() -> str | None:
        reply = await bob.conversations.GetUsage(conversation_pb2.GetUsageRequest(), metadata=b)
        m.received.append(reply.SerializeToString())
        usage = own.events[-1].turn_completed.usage
        counted = [(r.messages, r.completion_tokens) for r in reply.records]
        return None if counted == [(1, usage.completion_tokens)] else f"B's usage {counted}, B's turn {usage}"

    m.add("ConversationService", "GetUsage", "no ids: B's usage only", usage_is_bobs)

    covered = {case.method for case in m.cases}
    assert covered == PUBLIC_METHODS, f"not covered: {PUBLIC_METHODS - covered}; unknown: {covered - PUBLIC_METHODS}"

    trying_since = time.time()
    failures = await m.run()
    tried_until = time.time()
    assert failures == [], "\n".join(failures)
    leaked = [data for data in m.received if ALICE_WORD.encode() in data or b"alice" in data]
    assert leaked == [], f"B received A's data: {leaked}"

    # A's running turn went on to its end, after every one of B's calls, and A's data is intact.
    end = await finish(running)
    assert end.WhichOneof("kind") == "turn_completed", end
    assert end.time.ToMicroseconds() / 1e6 > tried_until, "A's turn ended before B had tried everything"
    listed = await alice.conversations.ListConversations(
        conversation_pb2.ListConversationsRequest(), metadata=alice.metadata)
    assert {c.conversation_id for c in listed.conversations} == {first.conversation_id, running.conversation_id}
    assert all(c.title != "bob's now" for c in listed.conversations)
    for turn in (first, running):
        stored = await alice.conversations.GetConversation(
            conversation_pb2.GetConversationRequest(conversation_id=turn.conversation_id), metadata=alice.metadata)
        assert [message.role for message in stored.messages] == [conversation_pb2.MESSAGE_ROLE_USER,
                                                                 conversation_pb2.MESSAGE_ROLE_ASSISTANT]
        assert stored.messages[1].status == conversation_pb2.MESSAGE_STATUS_COMPLETE
        assert stored.messages[1].content == text_of(turn.events)
    print(f"\n{len(m.cases)} calls by B over {len(PUBLIC_METHODS)} RPCs in {tried_until - trying_since:.2f} s: "
          f"all NOT_FOUND or B's own data; A's turn ended {end.time.ToMicroseconds() / 1e6 - tried_until:.1f} s later")
