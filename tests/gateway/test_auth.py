"""JWT authentication and per-user isolation: the user id comes only from a verified token."""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import jwt
import pytest
from chat_helpers import ChatStream, collect, kinds
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from duplex.common.errors import Unauthenticated
from gateway.auth import Authenticator, mint_token
from gateway.settings import GatewaySettings

SECRET = "test-secret-that-is-long-enough-for-hs256"


def settings(**overrides) -> GatewaySettings:
    return GatewaySettings(jwt_secret=SecretStr(SECRET), **overrides)


def token(claims: dict | None = None, key: str = SECRET, algorithm: str = "HS256", **headers) -> str:
    now = int(time.time())
    base = {"sub": "alice", "aud": "duplex", "iss": "duplex", "iat": now, "exp": now + 300}
    return jwt.encode({**base, **(claims or {})}, key, algorithm=algorithm, headers=headers or None)


def test_a_valid_token_names_its_subject():
    assert Authenticator(settings()).user_from_token(token()) == "alice"
    assert Authenticator(settings()).user_from_token(mint_token(settings(), "bob", 60)) == "bob"


@pytest.mark.parametrize(
    ("bad_token", "reason"),
    [
        (None, "required"),
        ("", "required"),
        ("not-a-jwt", "invalid token"),
        (token({"exp": int(time.time()) - 120}), "expired"),
        (token({"nbf": int(time.time()) + 600}), "invalid token"),
        (token({"aud": "someone-else"}), "invalid token"),
        (token({"iss": "someone-else"}), "invalid token"),
        (token(key="a-different-secret-of-sufficient-length"), "invalid token"),
        (token({"sub": ""}), "invalid token"),
        (jwt.encode({"sub": "alice", "aud": "duplex", "iss": "duplex", "exp": int(time.time()) + 60}, None,
                    algorithm="none"), "invalid token"),
    ],
)
def test_bad_tokens_are_unauthenticated(bad_token, reason):
    with pytest.raises(Unauthenticated) as raised:
        Authenticator(settings()).user_from_token(bad_token)
    assert reason in raised.value.message
    assert SECRET not in raised.value.message


def test_small_clock_skew_is_tolerated():
    almost_expired = token({"exp": int(time.time()) - 5})
    assert Authenticator(settings()).user_from_token(almost_expired) == "alice"


def test_rs256_public_key_and_jwks(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(pem)
    signed = token(key=private, algorithm="RS256", kid="k1")
    by_key = Authenticator(GatewaySettings(jwt_public_key_file=tmp_path / "public.pem"))
    assert by_key.user_from_token(signed) == "alice"

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    by_jwks = Authenticator(GatewaySettings(jwt_jwks_file=tmp_path / "jwks.json"))
    assert by_jwks.user_from_token(signed) == "alice"
    with pytest.raises(Unauthenticated):
        by_jwks.user_from_token(token(key=private, algorithm="RS256", kid="unknown"))
    # Algorithm confusion: an HMAC token is refused where only asymmetric algorithms are allowed.
    with pytest.raises(Unauthenticated):
        by_key.user_from_token(token(key="an-hmac-secret-that-is-long-enough-123", algorithm="HS256"))


def stubs(system, user: str | None):
    metadata = (("authorization", f"Bearer {token({'sub': user})}"),) if user else None
    channel = system.channel(system.gateway)
    return (
        chat_pb2_grpc.ChatServiceStub(channel),
        conversation_pb2_grpc.ConversationServiceStub(channel),
        metadata,
    )


async def test_calls_without_a_valid_token_are_unauthenticated(make_system):
    system = await make_system(jwt_secret=SecretStr(SECRET))
    chat, conversations, _ = stubs(system, None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await conversations.ListConversations(conversation_pb2.ListConversationsRequest())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(chat.SendMessage(chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(text="hi"))))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    expired = (("authorization", f"Bearer {token({'exp': int(time.time()) - 3600})}"),)
    call = chat.Chat(iter([chat_pb2.ChatRequest(open=chat_pb2.OpenSession())]), metadata=expired)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_another_users_session_and_conversation_are_not_found(make_system):
    system = await make_system(jwt_secret=SecretStr(SECRET))
    alice_chat, alice_conversations, alice = stubs(system, "alice")
    events = await collect(alice_chat.SendMessage(
        chat_pb2.SendMessageRequest(message=chat_pb2.UserMessage(text="alice's secret plan")), metadata=alice
    ))
    assert kinds(events)[-1] == "turn_completed"
    session_id = events[0].session_opened.session_id
    conversation_id = events[0].session_opened.conversation_id

    bob_chat, bob_conversations, bob = stubs(system, "bob")
    not_found = [
        bob_chat.ResumeStream(chat_pb2.ResumeStreamRequest(session_id=session_id), metadata=bob),
        bob_chat.SendMessage(chat_pb2.SendMessageRequest(
            session_id=session_id, message=chat_pb2.UserMessage(text="hijack")), metadata=bob),
        bob_chat.SendMessage(chat_pb2.SendMessageRequest(
            conversation_id=conversation_id, message=chat_pb2.UserMessage(text="hijack")), metadata=bob),
    ]
    for call in not_found:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(call)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    unary_calls = [
        bob_chat.CancelTurn(chat_pb2.CancelTurnRequest(session_id=session_id), metadata=bob),
        bob_chat.CloseSession(chat_pb2.CloseSessionRequest(session_id=session_id), metadata=bob),
        bob_conversations.GetConversation(
            conversation_pb2.GetConversationRequest(conversation_id=conversation_id), metadata=bob),
        bob_conversations.RenameConversation(
            conversation_pb2.RenameConversationRequest(conversation_id=conversation_id, title="mine"), metadata=bob),
        bob_conversations.ExportConversation(
            conversation_pb2.ExportConversationRequest(conversation_id=conversation_id), metadata=bob),
        bob_conversations.DeleteConversation(
            conversation_pb2.DeleteConversationRequest(conversation_id=conversation_id), metadata=bob),
    ]
    for call in unary_calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    bob_stream = ChatStream(bob_chat, metadata=bob)
    await bob_stream.send(open=chat_pb2.OpenSession(session_id=session_id))
    assert (await bob_stream.next_event()).error.code == grpc.StatusCode.NOT_FOUND.value[0]
    bob_stream.cancel()

    listed = await bob_conversations.ListConversations(conversation_pb2.ListConversationsRequest(), metadata=bob)
    assert list(listed.conversations) == []
    found = await bob_conversations.SearchMessages(conversation_pb2.SearchMessagesRequest(query="secret"),
                                                   metadata=bob)
    assert list(found.hits) == []
    # Alice still has everything.
    mine = await alice_conversations.GetConversation(
        conversation_pb2.GetConversationRequest(conversation_id=conversation_id), metadata=alice)
    assert mine.messages[0].content == "alice's secret plan"


def test_an_empty_secret_means_authentication_is_off():
    assert GatewaySettings(jwt_secret=SecretStr("")).jwt_secret is None
    assert Authenticator(GatewaySettings(jwt_secret=SecretStr(""))).enabled is False


def public_key_file(tmp_path, private) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return path


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_claims() -> bytes:
    return json.dumps({"sub": "mallory", "aud": "duplex", "iss": "duplex", "exp": int(time.time()) + 60}).encode()


def junk_signed(algorithm: str, **headers) -> str:
    """A token whose header names `algorithm` and whose signature is junk (a forger without the key)."""
    header = json.dumps({"alg": algorithm, "typ": "JWT", **headers}).encode()
    return f"{b64(header)}.{b64(forged_claims())}.{'A' * 86}"


@pytest.mark.parametrize("algorithm", ["ES256", "ES384", "EdDSA", "RS384", "PS256", "HS256"])
def test_a_token_whose_algorithm_does_not_fit_the_key_is_unauthenticated(tmp_path, algorithm):
    """Key-type confusion (an EC or EdDSA header on an RSA key) is a refused token, not an internal error."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    by_key = Authenticator(GatewaySettings(jwt_public_key_file=public_key_file(tmp_path, private)))
    with pytest.raises(Unauthenticated, match="invalid token"):
        by_key.user_from_token(junk_signed(algorithm))
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    by_jwks = Authenticator(GatewaySettings(jwt_jwks_file=tmp_path / "jwks.json"))
    with pytest.raises(Unauthenticated, match="invalid token"):
        by_jwks.user_from_token(junk_signed(algorithm, kid="k1"))


def test_an_hmac_token_signed_with_the_public_key_is_unauthenticated(tmp_path):
    """The classic confusion: HS256 keyed with the public PEM. Settings refuse an allowlist that would let
    it through; the authenticator refuses it even so."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = public_key_file(tmp_path, private)
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(forged_claims())}"
    signature = hmac.new(path.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64(signature)}"
    configured = GatewaySettings(jwt_public_key_file=path)
    for allowlist in (configured.jwt_algorithms, ["RS256", "HS256"]):
        configured.jwt_algorithms = allowlist  # the mixed list, as if it got past the settings check
        with pytest.raises(Unauthenticated, match="invalid token"):
            Authenticator(configured).user_from_token(forged)


@pytest.mark.parametrize(
    ("key", "algorithms"),
    [("secret", ["RS256", "HS256"]), ("secret", ["HS512", "EdDSA"]), ("public", ["RS256", "HS256"]),
     ("secret", ["RS256"])],
)
def test_an_allowlist_that_does_not_fit_the_key_is_refused(tmp_path, key, algorithms):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    given = {"jwt_secret": SecretStr(SECRET)} if key == "secret" else {
        "jwt_public_key_file": public_key_file(tmp_path, private)}
    with pytest.raises(ValueError, match="DUPLEX_JWT_ALGORITHMS"):
        GatewaySettings(**given, jwt_algorithms=algorithms)


@pytest.mark.parametrize("algorithms", [["HS256"], ["ES256"]])
def test_an_allowlist_with_nothing_for_the_public_key_is_refused(tmp_path, algorithms):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    configured = GatewaySettings(jwt_public_key_file=public_key_file(tmp_path, private), jwt_algorithms=algorithms)
    with pytest.raises(ValueError, match="no algorithm for the configured key"):
        Authenticator(configured)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"DUPLEX_JWT_SECRET": SECRET, "DUPLEX_JWT_ALGORITHMS": '["HS256", "RS256"]'},
         "DUPLEX_JWT_ALGORITHMS mixes shared-secret (HS256) and public-key (RS256)"),
        ({"DUPLEX_JWT_PUBLIC_KEY_FILE": "{junk}"}, "DUPLEX_JWT_PUBLIC_KEY_FILE {junk} holds no PEM public key"),
        ({"DUPLEX_JWT_PUBLIC_KEY_FILE": "{missing}"}, "DUPLEX_JWT_PUBLIC_KEY_FILE cannot be read"),
        ({"DUPLEX_JWT_JWKS_FILE": "{junk}"}, "DUPLEX_JWT_JWKS_FILE holds no usable key set"),
    ],
    ids=["mixed-allowlist", "not-a-key", "missing-file", "not-a-key-set"],
)
def test_a_key_or_allowlist_that_cannot_work_exits_2_with_one_line(tmp_path, variables, expected):
    (tmp_path / "junk").write_text("not a key\n")
    paths = {"junk": tmp_path / "junk", "missing": tmp_path / "missing.pem"}
    env = {key: value for key, value in os.environ.items() if not key.startswith("DUPLEX_")}
    env.update({"DUPLEX_GATEWAY_LISTEN": "127.0.0.1:0", "DUPLEX_HTTP_LISTEN": "127.0.0.1:0"})
    env.update({key: value.format(**paths) for key, value in variables.items()})
    done = subprocess.run([sys.executable, "-m", "gateway"], cwd=Path(__file__).parents[2], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gateway: bad configuration: {expected.format(**paths)}")
    assert SECRET not in done.stderr
