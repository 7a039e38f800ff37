"""The shipped Envoy edge in front of a real system: grpc-web, CORS, native gRPC, WebSocket and the page."""

import json
import uuid

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2
from tests.envoy.grpc_web_wire import grpc_web_call

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = "/duplex.chat.v1.ChatService"
CONVERSATIONS = "/duplex.chat.v1.ConversationService"
TURN_SHAPE = ["session_opened", "message_accepted", "turn_started", "delta", "turn_completed"]


def kind(event: chat_pb2.ChatEvent) -> str:
    return event.WhichOneof("kind")


def shape(kinds: list[str]) -> list[str]:
    """The kinds in order with runs of deltas folded into one, ignoring quota updates."""
    folded: list[str] = []
    for name in kinds:
        if name != "quota" and not (name == "delta" and folded and folded[-1] == "delta"):
            folded.append(name)
    return folded


def send_message_request(text: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(client_message_id=uuid.uuid4().hex, text=text))


async def send_message(envoy, text: str, **headers: str):
    async with aiohttp.ClientSession() as http:
        return await grpc_web_call(
            http, f"{envoy.url}{CHAT}/SendMessage", send_message_request(text), chat_pb2.SendMessageResponse,
            **headers,
        )


async def test_grpc_web_send_message_streams_a_whole_turn_incrementally(envoy):
    reply = await send_message(envoy, "hello through envoy")

    assert reply.status == 0, reply.status_message
    events = [response.event for response in reply.messages]
    kinds = [kind(event) for event in events]
    assert shape(kinds) == TURN_SHAPE
    assert kinds.count("delta") >= 5
    assert "hello through envoy" in "".join(event.delta.text for event in events)
    # Streamed, not buffered by Envoy: at 20 tokens/s the first words arrive seconds before the end.
    first_delta = reply.arrived_at[kinds.index("delta")]
    completed = reply.arrived_at[kinds.index("turn_completed")]
    assert completed - first_delta > 1.0


async def test_grpc_web_unary_conversation_calls_and_their_errors(envoy, allowed_origin):
    reply = await send_message(envoy, "remember this")
    conversation_id = reply.messages[0].event.session_opened.conversation_id

    async with aiohttp.ClientSession() as http:
        listed = await grpc_web_call(
            http, f"{envoy.url}{CONVERSATIONS}/ListConversations",
            conversation_pb2.ListConversationsRequest(), conversation_pb2.ListConversationsResponse,
        )
        fetched = await grpc_web_call(
            http, f"{envoy.url}{CONVERSATIONS}/GetConversation",
            conversation_pb2.GetConversationRequest(conversation_id=conversation_id),
            conversation_pb2.GetConversationResponse,
        )
        missing = await grpc_web_call(
            http, f"{envoy.url}{CONVERSATIONS}/GetConversation",
            conversation_pb2.GetConversationRequest(conversation_id=uuid.uuid4().hex),
            conversation_pb2.GetConversationResponse,
            origin=allowed_origin,
        )

    assert listed.status == 0, listed.status_message
    assert conversation_id in [c.conversation_id for c in listed.messages[0].conversations]
    assert fetched.status == 0, fetched.status_message
    roles = [message.role for message in fetched.messages[0].messages]
    assert roles == [conversation_pb2.MESSAGE_ROLE_USER, conversation_pb2.MESSAGE_ROLE_ASSISTANT]
    # An error reaches a cross-origin browser: status in the response, and readable by its script.
    assert missing.status == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.headers["access-control-allow-origin"] == allowed_origin
    assert "grpc-status" in missing.headers["access-control-expose-headers"]


async def test_cors_preflight_is_answered_for_configured_origins_only(envoy, allowed_origin):
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web,x-user-agent",
    }
    async with aiohttp.ClientSession() as http:
        url = f"{envoy.url}{CHAT}/SendMessage"
        async with http.options(url, headers={**preflight, "origin": allowed_origin}) as allowed:
            allowed_headers = allowed.headers
            allowed_status = allowed.status
        async with http.options(url, headers={**preflight, "origin": "http://evil.test"}) as refused:
            refused_headers = refused.headers

    assert allowed_status == 200
    assert allowed_headers["access-control-allow-origin"] == allowed_origin
    assert "POST" in allowed_headers["access-control-allow-methods"]
    assert {"content-type", "x-grpc-web", "x-user-agent"} <= set(
        allowed_headers["access-control-allow-headers"].split(",")
    )
    assert "access-control-allow-origin" not in refused_headers


async def test_native_grpc_bidi_chat_passes_through(envoy):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        requests = [
            chat_pb2.ChatRequest(open=chat_pb2.OpenSession()),
            chat_pb2.ChatRequest(message=chat_pb2.UserMessage(client_message_id=uuid.uuid4().hex, text="hi")),
        ]
        # The requests end after the message: a half-closed Chat still gets the turn, then completes.
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(iter(requests), timeout=20)
        kinds = [kind(response.event) async for response in call]

    assert shape(kinds) == TURN_SHAPE


async def test_both_gateway_ports_are_health_checked(envoy):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{envoy.admin_url}/clusters", params={"format": "json"}) as response:
            clusters = {cluster["name"]: cluster for cluster in (await response.json())["cluster_statuses"]}

    # grpc.health.v1 on the gRPC port, /healthz on the HTTP port; a failed check would be listed here.
    for name in ("gateway_grpc", "gateway_http"):
        (host,) = clusters[name]["host_statuses"]
        assert host["health_status"] == {"eds_health_status": "HEALTHY"}, (name, host["health_status"])


async def test_web_page_and_websocket_reach_the_gateway_http_edge(envoy):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{envoy.url}/") as page:
            assert page.status == 200
            assert page.content_type == "text/html"
        async with http.ws_connect(f"{envoy.url}/v1/chat") as socket:
            await socket.send_str(json.dumps({"open": {}}))
            frame = await socket.receive_str(timeout=10)

    response = json_format.Parse(frame, chat_pb2.ChatResponse(), ignore_unknown_fields=True)
    assert kind(response.event) == "session_opened"
