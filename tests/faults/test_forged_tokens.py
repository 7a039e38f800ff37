"""Forged tokens, refused on every edge: native gRPC (a unary call and the Chat stream), grpc-web, the
WebSocket (upgrade header and first frame) and the page's JSON endpoint, on a gateway keyed with a shared
secret and on one keyed with an RSA public key. Each refusal has the edge's own "unauthenticated" code
(UNAUTHENTICATED, grpc-status 16, HTTP 401, close 4401), never INTERNAL or 500, and the gateway goes on
serving a valid token afterwards."""

import asyncio
import base64
import hashlib
import hmac
import json
import struct
import time

import aiohttp
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import SecretStr

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from tests.conftest import start_system

pytestmark = pytest.mark.timeout(120)

SECRET = "a-shared-secret-that-is-long-enough-for-hs256"
LIST = "/duplex.chat.v1.ConversationService/ListConversations"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def claims(**changes) -> dict:
    now = int(time.time())
    return {"sub": "mallory", "aud": "duplex", "iss": "duplex", "iat": now, "exp": now + 300, **changes}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, body: dict, signature: bytes = b"\x00" * 64) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


def hmac_with(key: bytes, body: dict) -> str:
    """HS256 keyed with `key`, signed by hand: PyJWT itself refuses to use a PEM as an HMAC secret."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


class Keys:
    """The gateway's keys and a forger's: a valid token for each gateway, and the forgeries."""

    def __init__(self, tmp_path):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_file = tmp_path / "public.pem"
        self.public_key_file.write_bytes(self.public_pem)
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def valid(self, kind: str, user: str = "alice") -> str:
        if kind == "secret":
            return jwt.encode(claims(sub=user), SECRET, algorithm="HS256")
        return jwt.encode(claims(sub=user), self.rsa, algorithm="RS256")

    def forged(self, kind: str) -> dict[str, str]:
        """Made when a test runs, so none expires before it is used."""
        sign = (lambda body: jwt.encode(body, SECRET, algorithm="HS256")) if kind == "secret" else (
            lambda body: jwt.encode(body, self.rsa, algorithm="RS256"))
        return {
            "alg none": jwt.encode(claims(), None, algorithm="none"),
            "alg none, upper case": unsigned({"alg": "NONE"}, claims(), b""),
            "wrong key": jwt.encode(claims(), "another-secret-that-is-long-enough-too", algorithm="HS256")
            if kind == "secret" else jwt.encode(claims(), self.other_rsa, algorithm="RS256"),
            "expired": sign(claims(exp=int(time.time()) - 3600)),
            "not yet valid": sign(claims(nbf=int(time.time()) + 3600)),
            "wrong audience": sign(claims(aud="someone-else")),
            "wrong issuer": sign(claims(iss="someone-else")),
            "no subject": sign({k: v for k, v in claims().items() if k != "sub"}),
            "HS256 keyed with the public key PEM": hmac_with(self.public_pem, claims()),
            "ES256 header, junk signature": unsigned({"alg": "ES256"}, claims()),
            "EdDSA header, junk signature": unsigned({"alg": "EdDSA"}, claims()),
            "ES256 signed by the forger": jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), "ES256"),
            "EdDSA signed by the forger": jwt.encode(claims(), ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
            "signature cut off": sign(claims()).rsplit(".", 1)[0] + ".",
            "not a jwt": "not-a-jwt",
        }


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(params=["secret", "public key"])
async def gateway(request, keys, tmp_path):
    settings = {"jwt_secret": SecretStr(SECRET)} if request.param == "secret" else {
        "jwt_public_key_file": keys.public_key_file}
    system = await start_system(tmp_path / "data", ws_auth_timeout_seconds=2.0, **settings)
    try:
        async with aiohttp.ClientSession() as http:
            yield request.param, system, http
    finally:
        await asyncio.sleep(0.2)  # let background writes settle (see tests/web/web_helpers.py)
        await system.stop()


def web(system, path: str) -> str:
    return f"http://127.0.0.1:{system.gateway.web.port}{path}"


async def native_unary(system, bearer: str) -> grpc.StatusCode:
    stub = conversation_pb2_grpc.ConversationServiceStub(system.channel(system.gateway))
    try:
        await stub.ListConversations(
            conversation_pb2.ListConversationsRequest(), metadata=(("authorization", f"Bearer {bearer}"),), timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def native_stream(system, bearer: str) -> grpc.StatusCode:
    stub = chat_pb2_grpc.ChatServiceStub(system.channel(system.gateway))
    call = stub.Chat(iter([chat_pb2.ChatRequest(open=chat_pb2.OpenSession())]),
                     metadata=(("authorization", f"Bearer {bearer}"),), timeout=10)
    try:
        async for response in call:
            if response.event.WhichOneof("kind") == "session_opened":
                call.cancel()
                return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.UNKNOWN


async def grpc_web(system, http, bearer: str) -> tuple[int, int]:
    payload = conversation_pb2.ListConversationsRequest().SerializeToString()
    body = struct.pack(">BI", 0, len(payload)) + payload
    headers = {"Content-Type": "application/grpc-web+proto", "Authorization": f"Bearer {bearer}"}
    async with http.post(web(system, LIST), data=body, headers=headers) as response:
        raw = await response.read()
    status = response.headers.get("grpc-status")
    if status is None:  # messages, then a trailer frame
        trailer = raw[raw.rindex(b"grpc-status:"):]
        status = trailer.split(b"\r\n")[0].split(b":")[1].decode()
    return response.status, int(status)


async def websocket_header(system, http, bearer: str) -> int:
    try:
        async with http.ws_connect(web(system, "/v1/chat"), protocols=("duplex.v1", f"bearer.{bearer}")) as ws:
            await ws.send_json({"open": {}})
            message = await ws.receive(timeout=10)
            return 101 if message.type is aiohttp.WSMsgType.TEXT else -1
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status


async def websocket_first_frame(system, http, bearer: str) -> int:
    async with http.ws_connect(web(system, "/v1/chat"), protocols=("duplex.v1",)) as ws:
        await ws.send_json({"authorization": f"Bearer {bearer}"})
        await ws.send_json({"open": {}})
        message = await ws.receive(timeout=10)
        if message.type is aiohttp.WSMsgType.TEXT:
            return 1000
        return ws.close_code


async def page_json(system, http, bearer: str) -> int:
    async with http.get(web(system, "/v1/conversations"), headers={"Authorization": f"Bearer {bearer}"}) as response:
        return response.status


async def every_edge(system, http, bearer: str) -> dict[str, object]:
    return {
        "native unary": await native_unary(system, bearer),
        "native Chat stream": await native_stream(system, bearer),
        "grpc-web": await grpc_web(system, http, bearer),
        "WebSocket header": await websocket_header(system, http, bearer),
        "WebSocket first frame": await websocket_first_frame(system, http, bearer),
        "page JSON": await page_json(system, http, bearer),
    }


REFUSED = {
    "native unary": UNAUTHENTICATED,
    "native Chat stream": UNAUTHENTICATED,
    "grpc-web": (200, UNAUTHENTICATED.value[0]),
    "WebSocket header": 401,
    "WebSocket first frame": 4401,
    "page JSON": 401,
}
ACCEPTED = {
    "native unary": grpc.StatusCode.OK,
    "native Chat stream": grpc.StatusCode.OK,
    "grpc-web": (200, grpc.StatusCode.OK.value[0]),
    "WebSocket header": 101,
    "WebSocket first frame": 1000,
    "page JSON": 200,
}


async def test_forged_tokens_are_unauthenticated_on_every_edge(gateway, keys):
    kind, system, http = gateway
    assert await every_edge(system, http, keys.valid(kind)) == ACCEPTED  # the probes can tell
    forgeries = keys.forged(kind)
    for case, forged in forgeries.items():
        assert await every_edge(system, http, forged) == REFUSED, case
    assert await every_edge(system, http, keys.valid(kind, "bob")) == ACCEPTED  # and it still serves
