"""The Chat stream over WebSocket (/v1/chat): the native semantics, frames, limits, origins and auth."""

import asyncio

import aiohttp
import grpc
import pytest
from pydantic import SecretStr
from web_helpers import SECRET, kind, text_of, token, web_url

from duplex.chat.v1 import chat_pb2, conversation_pb2, conversation_pb2_grpc
from gateway.web.strict_websocket import MaskedFramesOnly


def kinds(events: list[dict]) -> list[str]:
    return [kind(event) for event in events]


async def stored_answer(system, conversation_id: str, bearer: str | None = None) -> str:
    """The assistant message as history stored it (over native gRPC)."""
    stub = conversation_pb2_grpc.ConversationServiceStub(system.channel(system.gateway))
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else None
    reply = await stub.GetConversation(
        conversation_pb2.GetConversationRequest(conversation_id=conversation_id), metadata=metadata
    )
    answers = [m.content for m in reply.messages if m.role == conversation_pb2.MESSAGE_ROLE_ASSISTANT]
    return answers[-1]


async def assert_still_serves(connect, system, **options) -> None:
    async with connect(system, **options) as chat:
        await chat.send({"ping": {"nonce": "still-there"}})
        assert (await chat.next_event())["pong"] == {"nonce": "still-there"}


async def test_an_answer_streams_as_json_frames_in_lower_camel_case(make_system, connect):
    system = await make_system()
    async with connect(system) as chat:
        assert chat.ws.protocol == "duplex.v1"
        opened = await chat.open()
        await chat.say("Hello over a WebSocket")
        events = await chat.until_turn_ends()

    assert kinds(events)[0] == "messageAccepted" and "turnStarted" in kinds(events)
    assert kinds(events)[-1] == "turnCompleted"
    assert kinds(events).count("delta") > 3
    assert "Hello over a WebSocket" in text_of(events)
    seqs = [int(event["seq"]) for event in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert all(isinstance(event["seq"], str) for event in events)  # uint64 as a JSON string
    assert '"sessionOpened":' in chat.raw_text[0] and '"turnId":' in chat.raw_text[-1]
    assert text_of(events) == await stored_answer(system, opened["conversationId"])


async def test_binary_frames_get_binary_replies(make_system, connect):
    system = await make_system()
    async with connect(system) as chat:
        await chat.send_binary(chat_pb2.ChatRequest(open=chat_pb2.OpenSession()))
        assert "sessionOpened" in await chat.next_event()
        message = chat_pb2.UserMessage(client_message_id="b1", text="binary please")
        await chat.send_binary(chat_pb2.ChatRequest(message=message))
        events = await chat.until_turn_ends()
        assert kinds(events)[-1] == "turnCompleted"
        assert set(chat.frame_types) == {aiohttp.WSMsgType.BINARY}
        await chat.send({"ping": {"nonce": "json again"}})  # the reply follows the client's latest frame
        assert (await chat.next_event())["pong"]["nonce"] == "json again"
        assert chat.frame_types[-1] is aiohttp.WSMsgType.TEXT


async def test_cancel_stops_the_running_turn(make_system, connect):
    system = await make_system(tokens_per_second=15)
    async with connect(system) as chat:
        await chat.open()
        await chat.say("Please stop me")
        before = await chat.until("delta")
        await chat.send({"cancel": {"turnId": before[-1]["turnId"]}})
        events = await chat.until_turn_ends()
    assert kinds(events)[-1] == "turnCancelled"
    assert "usage" in events[-1]["turnCancelled"]


async def test_a_dropped_socket_does_not_stop_the_turn_and_a_resume_misses_nothing(make_system, connect):
    system = await make_system(tokens_per_second=15)
    async with connect(system) as chat:
        opened = await chat.open()
        await chat.say("Resume me after a drop")
        first = await chat.until("delta")
        first += [await chat.next_event(), await chat.next_event()]
    # The socket is closed: a disconnect, not a half-close. The turn goes on without us.
    await asyncio.sleep(0.5)
    last_seen = int(first[-1]["seq"])
    async with connect(system) as chat:
        reopened = await chat.open(sessionId=opened["sessionId"], resumeAfterSeq=str(last_seen))
        rest = await chat.until_turn_ends()

    assert reopened["resumed"] is True
    assert [int(event["seq"]) for event in rest] == list(range(last_seen + 1, last_seen + 1 + len(rest)))
    assert kinds(rest)[-1] == "turnCompleted"
    assert text_of(first) + text_of(rest) == await stored_answer(system, opened["conversationId"])


async def test_the_same_client_message_id_is_answered_once(make_system, connect):
    system = await make_system()
    async with connect(system) as chat:
        await chat.open()
        await chat.say("Only once", client_message_id="same-id")
        events = await chat.until_turn_ends()
        await chat.say("Only once", client_message_id="same-id")
        duplicate = await chat.until("messageAccepted")
    assert kinds(events).count("turnStarted") == 1
    assert duplicate[-1]["messageAccepted"]["duplicate"] is True
    assert duplicate[-1].get("seq", "0") == "0"  # ephemeral: not logged, not answered again


BAD_FRAMES = [
    "not json at all",
    "",
    "[]",
    "null",
    '{"open": {}',  # truncated
    '{"bogus": {}}',  # unknown field
    '{"ping": {"nonce": 5}}',  # wrong type
    '{"open": "x"}',  # wrong type
    '{"open": {"resumeAfterSeq": -1}}',  # out of range
    '{"ping": {}, "open": {}}',  # two kinds of one oneof
    "{}",  # an empty request
]


async def test_invalid_frames_get_an_error_event_and_the_stream_goes_on(make_system, connect):
    system = await make_system()
    async with connect(system) as chat:
        for frame in BAD_FRAMES:
            await chat.ws.send_str(frame)
            event = await chat.next_event()
            assert event["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0], frame
            assert "Traceback" not in event["error"]["message"]
        await chat.ws.send_bytes(b"\xff\xff\xff")  # not protobuf
        assert (await chat.next_event())["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        await chat.open()
        await chat.say("Still working?")
        assert kinds(await chat.until_turn_ends())[-1] == "turnCompleted"


async def test_an_oversize_frame_closes_with_1009(make_system, connect):
    system = await make_system(http_max_message_bytes=4096)
    async with connect(system) as chat:
        await chat.open()
        await chat.send({"message": {"clientMessageId": "big", "text": "x" * 5000}})
        assert await chat.close_code() == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await assert_still_serves(connect, system)


async def test_origins_are_checked_before_the_upgrade(make_system, connect):
    system = await make_system()
    own = f"http://localhost:{system.gateway.web.port}"
    for origin in ("https://evil.example", "null", f"http://attacker.example:{system.gateway.web.port}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with connect(system, headers={"Origin": origin}):
                pass
        assert refused.value.status == 403
    await assert_still_serves(connect, system, headers={"Origin": own})
    await assert_still_serves(connect, system)  # no Origin: a non-browser client

    configured = await make_system(allowed_origins="https://app.example, https://admin.example")
    await assert_still_serves(connect, configured, headers={"Origin": "https://admin.example"})
    with pytest.raises(aiohttp.WSServerHandshakeError):
        async with connect(configured, headers={"Origin": f"http://localhost:{configured.gateway.web.port}"}):
            pass


async def test_an_idle_socket_is_closed_with_4408_and_pings_keep_watch(make_system, connect):
    system = await make_system(ws_idle_timeout_seconds=0.6, ws_heartbeat_seconds=0.2)
    async with connect(system, autoping=False) as chat:
        pinged = await asyncio.wait_for(chat.ws.receive(), 5)
        assert pinged.type is aiohttp.WSMsgType.PING
        await chat.ws.pong(pinged.data)
    async with connect(system) as chat:
        assert await chat.close_code() == 4408


# --- authentication ---

def bad_tokens() -> dict[str, str]:
    """Made when a test runs, not at import: a suite slower than the tokens' lifetime would expire them all."""
    return {
        "expired": token(exp=1_600_000_000),
        "alg none": token(key=None, algorithm="none"),
        "wrong audience": token(aud="someone-else"),
        "wrong key": token(key="another-secret-that-is-long-enough-too"),
        "not a jwt": "not-a-jwt",
    }


@pytest.fixture
async def secured(make_system):
    return await make_system(jwt_secret=SecretStr(SECRET), ws_auth_timeout_seconds=1.0)


async def test_a_token_in_the_subprotocol_header_or_the_first_frame_is_accepted(secured, connect):
    async with connect(secured, protocols=("duplex.v1", f"bearer.{token('alice')}")) as chat:
        assert chat.ws.protocol == "duplex.v1"
        alice = await chat.open()
    async with connect(secured) as chat:
        await chat.send({"authorization": f"Bearer {token('alice')}"})
        again = await chat.open(sessionId=alice["sessionId"])
    assert again["resumed"] is True  # the same user: the session is hers


async def test_bad_tokens_are_refused_and_the_server_still_serves(secured, connect):
    for case, bad in bad_tokens().items():
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with connect(secured, protocols=("duplex.v1", f"bearer.{bad}")):
                pass
        assert refused.value.status == 401, case

        async with connect(secured) as chat:
            await chat.send({"authorization": f"Bearer {bad}"})
            assert await chat.close_code() == 4401, case
            assert ("expired" if case == "expired" else "invalid token") in chat.close_reason, case

        await assert_still_serves(connect, secured, protocols=("duplex.v1", f"bearer.{token('bob')}"))


async def test_a_socket_without_a_token_closes_with_4401(secured, connect):
    async with connect(secured) as chat:
        await chat.send({"open": {}})  # not a token frame
        assert await chat.close_code() == 4401
        assert "token is required" in chat.close_reason
    async with connect(secured) as chat:  # says nothing at all
        assert await chat.close_code() == 4401
    await assert_still_serves(connect, secured, protocols=("duplex.v1", f"bearer.{token('bob')}"))


async def test_another_users_session_is_not_found(secured, connect):
    async with connect(secured, protocols=("duplex.v1", f"bearer.{token('alice')}")) as chat:
        alice = await chat.open()
    async with connect(secured, protocols=("duplex.v1", f"bearer.{token('mallory')}")) as chat:
        await chat.send({"open": {"sessionId": alice["sessionId"]}})
        refused = await chat.next_event()
        assert refused["error"]["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        own = await chat.open()  # the stream goes on
    assert own["sessionId"] != alice["sessionId"]


async def test_the_upgrade_needs_a_websocket_handshake(make_system, http):
    system = await make_system()
    async with http.get(web_url(system, "/v1/chat")) as response:
        assert response.status == 400


async def test_stopping_the_gateway_closes_sockets_with_1001(make_system, connect):
    system = await make_system()
    async with connect(system) as chat:
        await chat.open()
        stopping = asyncio.create_task(system.gateway.stop(1.0))
        assert await chat.close_code() == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(stopping, 10)


async def raw_upgrade(system) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand, so the test can send frames no well-behaved client library would."""
    reader, writer = await asyncio.open_connection("127.0.0.1", system.gateway.web.port)
    writer.write(
        b"GET /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_an_unmasked_client_frame_closes_with_1002(make_system, connect):
    """RFC 6455 5.1: a server MUST close the connection on a client frame that is not masked."""
    system = await make_system()
    reader, writer = await raw_upgrade(system)
    try:
        payload = b'{"ping":{"nonce":"n"}}'
        writer.write(bytes([0x81, len(payload)]) + payload)  # FIN + text, no mask bit
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(2), 5)
        assert header[0] == 0x88, header  # a close frame
        body = await reader.readexactly(header[1] & 0x7F)
        assert int.from_bytes(body[:2], "big") == aiohttp.WSCloseCode.PROTOCOL_ERROR
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
    finally:
        writer.close()
    await assert_still_serves(connect, system)


def masked_frame(payload: bytes, opcode: int = 0x2, masked: bool = True) -> bytes:
    size = len(payload)
    length = bytes([size]) if size < 126 else (
        bytes([126]) + size.to_bytes(2) if size < 1 << 16 else bytes([127]) + size.to_bytes(8))
    length = bytes([length[0] | (0x80 if masked else 0)]) + length[1:]
    key = b"\x01\x02\x03\x04" if masked else b""
    return bytes([0x80 | opcode]) + length + key + payload  # the payload's masking is the parser's business


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_the_mask_guard_follows_frames_of_every_length_split_anywhere(chunk):
    """Masked frames pass untouched however the bytes arrive; the first unmasked one is refused."""
    fed, refused = bytearray(), []

    class Parser:
        def feed_data(self, data):
            fed.extend(data)
            return False, b""

    guard = MaskedFramesOnly(Parser(), refused.append)
    good = b"".join(masked_frame(b"x" * size) for size in (0, 5, 125, 126, 300, 65_535, 65_536, 70_000))
    stream = good + masked_frame(b"bad", masked=False) + masked_frame(b"never")
    for start in range(0, len(stream), chunk):
        guard.feed_data(stream[start : start + chunk])
    # What was passed on is the stream up to the chunk where the unmasked frame's second byte came.
    assert bytes(fed) == stream[: len(fed)] and len(good) - chunk < len(fed) <= len(good) + 1
    [error] = refused
    assert error.code == aiohttp.WSCloseCode.PROTOCOL_ERROR
