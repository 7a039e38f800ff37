"""Every failure is an error event or a gRPC status with the right code: never a hang or a trace."""

import asyncio

import grpc
import pytest
from chat_helpers import ChatStream, collect, kinds
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.common.server import LIVENESS, is_serving
from duplex.session.v1 import session_pb2


def code_of(event) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == event.error.code)


async def test_bad_requests_get_error_events_and_the_stream_goes_on(system):
    chat = ChatStream(system.chat)
    await chat.say("before opening")
    assert code_of(await chat.next_event()) == grpc.StatusCode.FAILED_PRECONDITION
    await chat.send()  # no kind at all
    assert code_of(await chat.next_event()) == grpc.StatusCode.INVALID_ARGUMENT

    await chat.open()
    await chat.send(open=chat_pb2.OpenSession())
    assert code_of(await chat.next_event()) == grpc.StatusCode.FAILED_PRECONDITION
    await chat.say("   ")
    assert code_of(await chat.next_event()) == grpc.StatusCode.INVALID_ARGUMENT
    await chat.say("x" * 40_000)
    event = await chat.next_event()
    assert code_of(event) == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than" in event.error.message

    await chat.say("still here?")
    assert kinds(await chat.until_turn_ends())[-1] == "turn_completed"
    chat.cancel()


# (a Chat request, a ListConversations request) that do not parse.
MALFORMED_REQUESTS = {
    "not protobuf": (b"\xff\xff\xff", b"\xff\xff\xff"),
    "a truncated varint": (b"\x08\xff", b"\x08\xff"),
    # ChatRequest.message holding a UserMessage whose text is not UTF-8; a page_token that is not UTF-8.
    "bad utf-8 in a string": (b"\x12\x04\x12\x02\xc3\x28", b"\x12\x02\xc3\x28"),
}


@pytest.mark.parametrize(("chat_body", "list_body"), MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
async def test_a_malformed_request_message_is_invalid_argument(system, chat_body, list_body):
    """A client whose messages do not parse is told INVALID_ARGUMENT (what, and no internals), on the Chat
    stream and on a unary call."""
    channel = system.channel(system.gateway)
    raw_chat = channel.stream_stream("/duplex.chat.v1.ChatService/Chat")  # no serializers: bytes as given
    call = raw_chat(iter([chat_pb2.ChatRequest(ping=chat_pb2.Ping(nonce="n")).SerializeToString(), chat_body]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("malformed request: ")
    assert "class" not in raised.value.details()
    raw_list = channel.unary_unary("/duplex.chat.v1.ConversationService/ListConversations")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw_list(list_body)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_session_or_conversation_is_not_found(system):
    chat = ChatStream(system.chat)
    await chat.send(open=chat_pb2.OpenSession(session_id="no-such-session"))
    event = await chat.next_event()
    assert code_of(event) == grpc.StatusCode.NOT_FOUND
    await chat.send(open=chat_pb2.OpenSession(conversation_id="no-such-conversation"))
    assert code_of(await chat.next_event()) == grpc.StatusCode.NOT_FOUND
    chat.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(system.chat.ResumeStream(chat_pb2.ResumeStreamRequest(session_id="nope")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await system.chat.CancelTurn(chat_pb2.CancelTurnRequest(session_id="nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        request = chat_pb2.SendMessageRequest(session_id="nope", message=chat_pb2.UserMessage(text="hi"))
        await collect(system.chat.SendMessage(request))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await system.chat.CancelTurn(chat_pb2.CancelTurnRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_another_users_session_is_not_found(system):
    # A session owned by someone else, created behind the gateway's back.
    other = await system.session_store.OpenSession(
        session_pb2.OpenSessionRequest(user_id="mallory", conversation_id="c")
    )
    chat = ChatStream(system.chat)
    await chat.send(open=chat_pb2.OpenSession(session_id=other.session.session_id))
    assert code_of(await chat.next_event()) == grpc.StatusCode.NOT_FOUND
    chat.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(system.chat.ResumeStream(chat_pb2.ResumeStreamRequest(session_id=other.session.session_id)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_model_ends_the_turn_with_an_error_event(system):
    chat = ChatStream(system.chat)
    await chat.open(model="no-such-model")
    await chat.say("hello")
    events = await chat.until_turn_ends()
    assert kinds(events) == ["message_accepted", "error"]
    assert code_of(events[-1]) == grpc.StatusCode.NOT_FOUND
    assert events[-1].seq == events[0].seq + 1  # a logged, terminal event of the turn
    assert "no-such-model" in events[-1].error.message
    chat.cancel()


async def test_llm_service_down_is_a_retryable_unavailable_error(system):
    await system.llm.stop(0)
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("anyone there?")
    events = await chat.until_turn_ends()
    assert code_of(events[-1]) == grpc.StatusCode.UNAVAILABLE
    assert events[-1].error.retryable is True
    assert "Traceback" not in events[-1].error.message
    chat.cancel()


async def test_history_service_down_refuses_the_message_cleanly(system):
    chat = ChatStream(system.chat)
    await chat.open()
    await system.history.stop(0)
    await chat.say("will this be stored?")
    event = await chat.next_event()
    assert code_of(event) == grpc.StatusCode.UNAVAILABLE
    assert event.error.retryable is True
    await chat.send(ping=chat_pb2.Ping(nonce="alive"))
    assert (await chat.next_event()).pong.nonce == "alive"
    chat.cancel()


async def test_gateway_stopping_mid_turn_ends_it_with_a_retryable_error_in_the_log(make_system):
    system = await make_system(tokens_per_second=20)
    chat = ChatStream(system.chat)
    opened = await chat.open()
    await chat.say("interrupt me")
    seen = await chat.until("delta")
    await system.gateway.stop(0)

    log = system.session_store.ReadEvents(
        session_pb2.ReadEventsRequest(user_id="local", session_id=opened.session_opened.session_id)
    )
    logged = [chat_pb2.ChatEvent.FromString(e.payload) async for batch in log for e in batch.events]
    assert logged[-1].WhichOneof("kind") == "error"
    assert logged[-1].error.retryable is True
    assert logged[-1].turn_id == seen[0].turn_id


async def test_quota_is_reported_and_enforced_with_a_retry_after(make_system):
    system = await make_system(session_overrides={"quota_messages_per_minute": 2})
    chat = ChatStream(system.chat)
    await chat.open()
    remaining = []
    for text in ("one", "two"):
        await chat.say(text)
        events = await chat.until_turn_ends()
        remaining += [e.quota.messages_remaining for e in events if e.WhichOneof("kind") == "quota"]
        assert kinds(events)[-1] == "turn_completed"
    assert remaining == [1, 0]

    await chat.say("three")
    refused = await chat.next_event()
    assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.error.retryable is True
    assert 0 < refused.error.retry_after.ToMilliseconds() <= 60_000
    chat.cancel()


def rich_details(error: grpc.RpcError) -> tuple[error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure]:
    """RetryInfo and QuotaFailure as any gRPC client reads them (grpcio-status, grpc-status-details-bin)."""
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin"
    assert status.code == error.code().value[0] and status.message == error.details()
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    unpacked = {type(message).__name__: detail.Unpack(message) for detail in status.details
                for message in (retry, failure) if detail.Is(message.DESCRIPTOR)}
    assert unpacked == {"RetryInfo": True, "QuotaFailure": True}, status
    return retry, failure


async def test_a_refused_message_carries_retry_info_and_quota_failure_in_its_status(make_system):
    system = await make_system(session_overrides={"quota_messages_per_minute": 1})
    first = chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(text="one"))
    assert kinds(await collect(system.chat.SendMessage(first)))[-1] == "turn_completed"

    again = chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(text="two"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(system.chat.SendMessage(again))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry, failure = rich_details(raised.value)
    assert 0 < retry.retry_delay.ToMilliseconds() <= 60_000
    [violation] = failure.violations
    assert (violation.subject, violation.quota_id, violation.quota_metric, violation.quota_value) == (
        "user", "MessagesPerMinutePerUser", "duplex/messages", 1
    )
    assert violation.description == raised.value.details() == "message quota exhausted: 1 messages per minute"

    # A plain blocking client reads the same from its RpcError.
    def blocking_send() -> grpc.RpcError:
        with grpc.insecure_channel(f"127.0.0.1:{system.gateway.port}") as channel:
            try:
                list(chat_pb2_grpc.ChatServiceStub(channel).SendMessage(again, timeout=10))
            except grpc.RpcError as error:
                return error
        raise AssertionError("the message was not refused")

    error = await asyncio.to_thread(blocking_send)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(error)[1].violations[0].quota_id == "MessagesPerMinutePerUser"

    # On a Chat stream the refusal is an event (the stream goes on); its fields say the same.
    chat = ChatStream(system.chat)
    await chat.open()
    await chat.say("three")
    event = await chat.next_event()
    assert code_of(event) == grpc.StatusCode.RESOURCE_EXHAUSTED and event.error.retryable
    assert 0 < event.error.retry_after.ToMilliseconds() <= 60_000
    chat.cancel()


async def test_a_status_that_says_nothing_of_retrying_carries_no_details(system):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        request = chat_pb2.SendMessageRequest(session_id="nope", message=chat_pb2.UserMessage(text="hi"))
        await collect(system.chat.SendMessage(request))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_status.from_call(raised.value) is None


async def test_an_inner_service_down_makes_the_gateway_unready_but_not_dead(make_system):
    system = await make_system(dependency_check_interval_seconds=0.1)
    channel = system.channel(system.gateway)
    assert await is_serving(channel, "duplex.chat.v1.ChatService")
    assert await is_serving(channel, LIVENESS)
    await system.session.stop(0)
    for _ in range(50):
        if not await is_serving(channel, "duplex.chat.v1.ChatService"):
            break
        await asyncio.sleep(0.1)
    assert not await is_serving(channel, "duplex.chat.v1.ChatService")  # readiness: no new traffic here
    assert not await is_serving(channel, "")
    assert await is_serving(channel, LIVENESS)  # liveness: a restart would not bring the session service back
