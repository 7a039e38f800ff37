"""grpc-web over raw HTTP: unary and server-streaming calls in binary and text mode, streaming without
buffering, CORS, trailers, auth, and malformed requests."""

import asyncio
import base64
import struct
import time
from urllib.parse import unquote

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pydantic import SecretStr
from web_helpers import (
    GRPC_WEB,
    GRPC_WEB_TEXT,
    SECRET,
    decode_grpc_web,
    decode_text,
    grpc_web_body,
    status_of,
    token,
    web_url,
)

from duplex.chat.v1 import chat_pb2, conversation_pb2
from gateway.web.grpcweb import percent_encode

LIST = "/duplex.chat.v1.ConversationService/ListConversations"
SEND = "/duplex.chat.v1.ChatService/SendMessage"
CANCEL = "/duplex.chat.v1.ChatService/CancelTurn"
OK = grpc.StatusCode.OK.value[0]
ALL_CONTENT_TYPES = ["application/grpc-web", GRPC_WEB, "application/grpc-web-text", GRPC_WEB_TEXT]


async def call(http, system, path, message, content_type=GRPC_WEB, headers=None):
    """One grpc-web call, read to its end: (response, messages, trailers)."""
    body = message if isinstance(message, bytes) else grpc_web_body(message, content_type)
    async with http.post(
        web_url(system, path), data=body, headers={"Content-Type": content_type, "X-Grpc-Web": "1", **(headers or {})}
    ) as response:
        raw = await response.read()
    messages, trailers = decode_grpc_web(raw, content_type) if response.status == 200 else ([], {})
    return response, messages, trailers


def send_request(text: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(client_message_id=text, text=text))


def events_of(messages: list[bytes]) -> list[chat_pb2.ChatEvent]:
    return [chat_pb2.SendMessageResponse.FromString(m).event for m in messages]


@pytest.mark.parametrize("content_type", ALL_CONTENT_TYPES)
async def test_unary_and_server_streaming_calls_work_in_every_content_type(make_system, http, content_type):
    system = await make_system()
    response, messages, trailers = await call(http, system, SEND, send_request("Hi grpc-web"), content_type)
    events = events_of(messages)
    expected_type = "application/grpc-web-text+proto" if "text" in content_type else "application/grpc-web+proto"
    assert response.headers["Content-Type"] == expected_type
    assert status_of(response, trailers) == OK
    assert events[0].WhichOneof("kind") == "session_opened"
    assert events[-1].WhichOneof("kind") == "turn_completed"
    assert sum(e.WhichOneof("kind") == "delta" for e in events) > 3

    listing = conversation_pb2.ListConversationsRequest()
    response, messages, trailers = await call(http, system, LIST, listing, content_type)
    listed = conversation_pb2.ListConversationsResponse.FromString(messages[0])
    assert status_of(response, trailers) == OK and len(messages) == 1
    assert [c.conversation_id for c in listed.conversations] == [events[0].session_opened.conversation_id]


@pytest.mark.parametrize("content_type", [GRPC_WEB, GRPC_WEB_TEXT])
async def test_a_stream_arrives_frame_by_frame_before_the_turn_ends(make_system, http, content_type):
    system = await make_system(tokens_per_second=20)
    body, chunks, first_delta_at = b"", 0, None
    async with http.post(
        web_url(system, SEND), data=grpc_web_body(send_request("Stream me"), content_type),
        headers={"Content-Type": content_type},
    ) as response:
        async for chunk in response.content.iter_any():
            body, chunks = body + chunk, chunks + 1
            if first_delta_at is None and any(e.WhichOneof("kind") == "delta" for e in arrived(body, content_type)):
                first_delta_at = time.monotonic()
    ended_at = time.monotonic()

    _, trailers = decode_grpc_web(body, content_type)
    assert trailers["grpc-status"] == "0"
    assert chunks > 10  # many writes, not one buffered body
    assert ended_at - first_delta_at > 1.0  # deltas were readable while the turn ran (~2 s at 20 tokens/s)


def arrived(body: bytes, content_type: str) -> list[chat_pb2.ChatEvent]:
    """The events whose frames have fully arrived in `body` so far."""
    data = decode_text(body[: len(body) - len(body) % 4]) if "text" in content_type else body
    events = []
    while len(data) >= 5:
        flag, length = struct.unpack(">BI", data[:5])
        if len(data) < 5 + length or flag != 0:
            break
        events.append(chat_pb2.SendMessageResponse.FromString(data[5 : 5 + length]).event)
        data = data[5 + length :]
    return events


async def test_cors_preflight_and_response_headers(make_system, http):
    system = await make_system()
    origin = f"http://localhost:{system.gateway.web.port}"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-grpc-web,authorization"}
    async with http.options(web_url(system, SEND), headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == origin
        allowed = response.headers["Access-Control-Allow-Headers"]
        for header in ("content-type", "x-grpc-web", "x-user-agent", "authorization", "grpc-timeout"):
            assert header in allowed
    async with http.options(web_url(system, SEND), headers={**preflight, "Origin": "https://evil.example"}) as refused:
        assert refused.status == 403

    response, _, _ = await call(
        http, system, CANCEL, chat_pb2.CancelTurnRequest(session_id="nope"), headers={"Origin": origin}
    )
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert set(response.headers["Access-Control-Expose-Headers"].split(", ")) >= {"grpc-status", "grpc-message"}
    response, _, _ = await call(http, system, CANCEL, chat_pb2.CancelTurnRequest(), headers={"Origin": "https://evil.example"})
    assert response.status == 403


async def test_errors_come_as_trailers_only_or_as_trailers_after_messages(make_system, http):
    system = await make_system()
    response, messages, trailers = await call(http, system, CANCEL, chat_pb2.CancelTurnRequest())
    assert messages == [] and trailers == {}  # trailers-only: the status is in the headers
    assert response.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert response.headers["grpc-message"] == "session_id is required"

    resume = "/duplex.chat.v1.ChatService/ResumeStream"
    response, _, _ = await call(http, system, resume, chat_pb2.ResumeStreamRequest(session_id="missing"))
    assert response.headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])

    # A deadline that passes mid-stream ends the stream with trailers after the messages.
    slow = await make_system(tokens_per_second=10)
    response, messages, trailers = await call(
        http, slow, SEND, send_request("Too slow"), headers={"grpc-timeout": "700m"}
    )
    assert len(messages) > 1
    assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])


def test_grpc_message_is_percent_encoded():
    assert percent_encode("plain text: ok") == "plain text: ok"
    assert percent_encode("100% über\r\n") == "100%25 %C3%BCber%0D%0A"


async def test_without_a_token_calls_are_unauthenticated_when_auth_is_on(make_system, http):
    system = await make_system(jwt_secret=SecretStr(SECRET))
    unauthenticated = str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": f"Bearer {token(exp=1)}"}):
        response, _, _ = await call(http, system, LIST, conversation_pb2.ListConversationsRequest(), headers=headers)
        assert response.headers["grpc-status"] == unauthenticated, headers
    response, messages, trailers = await call(
        http, system, LIST, conversation_pb2.ListConversationsRequest(),
        headers={"Authorization": f"Bearer {token('alice')}"},
    )
    assert status_of(response, trailers) == OK and len(messages) == 1


MALFORMED = {
    "empty body": (GRPC_WEB, b"", "INVALID_ARGUMENT"),
    "truncated length prefix": (GRPC_WEB, b"\x00\x00\x00", "INVALID_ARGUMENT"),
    "length past the end": (GRPC_WEB, b"\x00\x00\x00\x00\x09abc", "INVALID_ARGUMENT"),
    "two messages": (GRPC_WEB, b"\x00\x00\x00\x00\x00" * 2, "INVALID_ARGUMENT"),
    "compressed flag": (GRPC_WEB, b"\x01\x00\x00\x00\x00", "UNIMPLEMENTED"),
    "trailer flag from a client": (GRPC_WEB, b"\x80\x00\x00\x00\x00", "INVALID_ARGUMENT"),
    "bad base64": (GRPC_WEB_TEXT, b"!!!notbase64!!!", "INVALID_ARGUMENT"),
    "base64 of a bad length": (GRPC_WEB_TEXT, b"AAAAAAA", "INVALID_ARGUMENT"),
    # Framing is fine, the message is not: the native server refuses it as it refuses a native caller.
    "not protobuf": (GRPC_WEB, b"\x00\x00\x00\x00\x03\xff\xff\xff", "INVALID_ARGUMENT"),
    "truncated varint": (GRPC_WEB, b"\x00\x00\x00\x00\x02\x08\xff", "INVALID_ARGUMENT"),
    "invalid utf-8 in a string": (GRPC_WEB, grpc_web_body(b"\x12\x02\xc3\x28"), "INVALID_ARGUMENT"),
}


async def test_malformed_requests_get_a_clean_error_and_the_server_still_serves(make_system, http):
    system = await make_system()
    for case, (content_type, body, code) in MALFORMED.items():
        response, _, trailers = await call(http, system, LIST, body, content_type)
        assert response.status == 200, case
        assert status_of(response, trailers) == grpc.StatusCode[code].value[0], case
        message = unquote(trailers.get("grpc-message", response.headers.get("grpc-message", "")))
        assert message and "class" not in message and "Error" not in message, (case, message)
        response, messages, trailers = await call(http, system, LIST, conversation_pb2.ListConversationsRequest())
        assert status_of(response, trailers) == OK and len(messages) == 1, case


async def test_unknown_methods_other_content_types_and_huge_bodies_are_refused(make_system, http):
    system = await make_system()
    unimplemented = str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    for path in ("/duplex.chat.v1.ChatService/Chat", "/duplex.chat.v1.ChatService/Nope", "/no.such.Service/Call"):
        response, _, _ = await call(http, system, path, chat_pb2.ChatRequest())
        assert response.headers["grpc-status"] == unimplemented, path
    async with http.post(web_url(system, LIST), data=b"{}", headers={"Content-Type": "application/json"}) as wrong:
        assert wrong.status == 415
    too_big = grpc_web_body(b"x" * 200_000)
    async with http.post(web_url(system, LIST), data=too_big, headers={"Content-Type": GRPC_WEB}) as refused:
        assert refused.status == 413


@pytest.mark.parametrize("content_type", [GRPC_WEB, GRPC_WEB_TEXT])
async def test_the_message_limit_is_exactly_the_documented_size_in_either_mode(make_system, http, content_type):
    """DUPLEX_HTTP_MAX_MESSAGE_BYTES is the message's own size, whether the body is binary or base64."""
    system = await make_system()
    limit = 131_072

    def request_of(size: int) -> bytes:  # a ListConversationsRequest whose page_token fills it to `size` bytes
        return conversation_pb2.ListConversationsRequest(page_token="t" * (size - 4)).SerializeToString()

    at_limit, over_limit = request_of(limit), request_of(limit + 1)
    assert (len(at_limit), len(over_limit)) == (limit, limit + 1)
    response, _, trailers = await call(http, system, LIST, grpc_web_body(at_limit, content_type), content_type)
    assert response.status == 200  # within the limit, the call is made (and the odd page token refused)
    assert status_of(response, trailers) != grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    response, _, _ = await call(http, system, LIST, grpc_web_body(over_limit, content_type), content_type)
    assert response.status == 413
    assert response.headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_arrives(make_system):
    """A request that declares 1 GB and sends 3 bytes is answered at once, not waited on."""
    system = await make_system()
    reader, writer = await asyncio.open_connection("127.0.0.1", system.gateway.web.port)
    try:
        writer.write(
            f"POST {LIST} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {GRPC_WEB}\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n".encode() + b"abc"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] == b"413", status_line


async def test_a_dropped_request_cancels_the_proxied_call_but_not_the_turn(make_system, http):
    system = await make_system(tokens_per_second=20)
    proxy = system.gateway.web.grpc_web
    async with http.post(
        web_url(system, SEND), data=grpc_web_body(send_request("Drop me")), headers={"Content-Type": GRPC_WEB}
    ) as response:
        events = [await read_event(response)]
        while events[-1].WhichOneof("kind") != "delta":  # the turn runs: dropping now cannot stop its start
            events.append(await read_event(response))
        assert proxy.active_calls == 1
        response.close()  # drop the connection mid-stream
    await eventually(lambda: proxy.active_calls == 0)

    # The turn went on without its caller: a resume follows it to its normal end.
    resume = chat_pb2.ResumeStreamRequest(session_id=events[0].session_opened.session_id)
    response, messages, trailers = await call(http, system, "/duplex.chat.v1.ChatService/ResumeStream", resume)
    events = [chat_pb2.ResumeStreamResponse.FromString(m).event for m in messages]
    assert status_of(response, trailers) == OK
    assert events[-1].WhichOneof("kind") == "turn_completed"


async def read_event(response) -> chat_pb2.ChatEvent:
    _, length = struct.unpack(">BI", await response.content.readexactly(5))
    return chat_pb2.SendMessageResponse.FromString(await response.content.readexactly(length)).event


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("content_type", [GRPC_WEB, GRPC_WEB_TEXT])
async def test_a_quota_refusal_carries_its_rich_status_over_grpc_web(make_system, http, content_type):
    system = await make_system(session_overrides={"quota_messages_per_minute": 1})
    response, _, trailers = await call(http, system, SEND, send_request("one"), content_type)
    assert status_of(response, trailers) == OK
    origin = f"http://localhost:{system.gateway.web.port}"
    response, messages, trailers = await call(
        http, system, SEND, send_request("two"), content_type, headers={"Origin": origin}
    )
    # A page may read it from a trailers-only response too (the status in the HTTP headers).
    assert "grpc-status-details-bin" in response.headers["Access-Control-Expose-Headers"].split(", ")
    # The session is opened (one message), then the message is refused: the status is in the trailers.
    assert [event.WhichOneof("kind") for event in events_of(messages)] == ["session_opened"]
    assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    status = status_pb2.Status.FromString(base64.b64decode(trailers["grpc-status-details-bin"]))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.message == unquote(trailers["grpc-message"]) == "message quota exhausted: 1 messages per minute"
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(failure)
    assert 0 < retry.retry_delay.ToMilliseconds() <= 60_000
    assert failure.violations[0].quota_id == "MessagesPerMinutePerUser"
