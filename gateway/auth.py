"""Who is calling. The user id comes from a verified JWT (or, without auth configured, is the one local
user); it never comes from a request body.

Tokens: `Authorization: Bearer <jwt>` on gRPC and grpc-web; on the WebSocket the `Sec-WebSocket-Protocol`
header or the first frame (never the URL, which ends up in logs).
"""

import json
import logging
import time
from pathlib import Path

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from duplex.common.errors import Unauthenticated
from duplex.common.settings import ConfigurationError
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Asymmetric and HMAC algorithms we accept; "none" is never among them.
SHARED_SECRET_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"})
ALLOWED_ALGORITHMS = SHARED_SECRET_ALGORITHMS | PUBLIC_KEY_ALGORITHMS
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def algorithms_for(key) -> frozenset[str]:
    """The algorithms a key can verify: a token naming any other is refused before its key is used, so a
    forged header cannot make PyJWT use an RSA key as an EC key or a PEM as an HMAC secret."""
    if isinstance(key, str | bytes):
        return SHARED_SECRET_ALGORITHMS
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({EC_ALGORITHMS.get(key.curve.name, "")}) - {""}
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def load_public_key(path: Path):
    """A PEM public key or certificate's key; ConfigurationError (one line) for anything else."""
    try:
        pem = Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(f"DUPLEX_JWT_PUBLIC_KEY_FILE cannot be read: {error.strerror}") from None
    try:
        if b"CERTIFICATE" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return load_pem_public_key(pem)
    except ValueError:
        raise ConfigurationError(f"DUPLEX_JWT_PUBLIC_KEY_FILE {path} holds no PEM public key or certificate") from None


class Authenticator:
    """Verifies bearer tokens. With no key configured, every caller is `local_user_id`."""

    def __init__(self, settings: GatewaySettings):
        self._settings = settings
        self._algorithms = [a for a in settings.jwt_algorithms if a in ALLOWED_ALGORITHMS]
        self._key = self._load_key(settings)
        self._jwks = self._load_jwks(settings.jwt_jwks_file)
        self.enabled = self._key is not None or self._jwks is not None
        if self.enabled and not self._algorithms:
            raise ConfigurationError("DUPLEX_JWT_ALGORITHMS allows no supported algorithm")
        if self._key is not None and not algorithms_for(self._key) & set(self._algorithms):
            raise ConfigurationError(f"DUPLEX_JWT_ALGORITHMS ({', '.join(self._algorithms)}) has no algorithm for the "
                             f"configured key (it verifies {', '.join(sorted(algorithms_for(self._key)))})")

    @staticmethod
    def _load_key(settings: GatewaySettings):
        if settings.jwt_secret is not None:
            return settings.jwt_secret.get_secret_value()
        if settings.jwt_public_key_file is not None:
            return load_public_key(settings.jwt_public_key_file)
        return None

    @staticmethod
    def _load_jwks(path: Path | None) -> jwt.PyJWKSet | None:
        if path is None:
            return None
        try:
            return jwt.PyJWKSet.from_json(Path(path).read_text())
        except OSError as error:
            raise ConfigurationError(f"DUPLEX_JWT_JWKS_FILE cannot be read: {error.strerror}") from None
        except (ValueError, jwt.PyJWTError) as error:  # not JSON, or no usable key in it
            raise ConfigurationError(f"DUPLEX_JWT_JWKS_FILE holds no usable key set: {error}") from None

    def warn_if_disabled(self) -> None:
        secret = self._settings.jwt_secret
        if secret is not None and len(secret.get_secret_value()) < 32:
            log.warning("DUPLEX_JWT_SECRET is shorter than 32 bytes; use a longer random secret")
        if not self.enabled:
            log.warning(
                "AUTHENTICATION IS OFF: every caller is user %r. Set DUPLEX_JWT_SECRET, "
                "DUPLEX_JWT_PUBLIC_KEY_FILE or DUPLEX_JWT_JWKS_FILE before exposing this gateway.",
                self._settings.local_user_id,
            )

    def user_from_token(self, token: str | None) -> str:
        """The verified subject of `token`; Unauthenticated for anything else."""
        if not self.enabled:
            return self._settings.local_user_id
        if not token:
            raise Unauthenticated("a bearer token is required")
        try:
            key = self._verification_key(token)
            claims = jwt.decode(
                token, key, algorithms=[a for a in self._algorithms if a in algorithms_for(key)],
                audience=self._settings.jwt_audience, issuer=self._settings.jwt_issuer,
                leeway=self._settings.jwt_leeway_seconds, options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"invalid token: {_reason(error)}") from None
        except jwt.PyJWTError:  # a key PyJWT refuses for this token (InvalidKeyError): still a bad token
            raise Unauthenticated("invalid token: its algorithm does not fit the key") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise Unauthenticated("invalid token: bad subject")
        return subject

    def _verification_key(self, token: str):
        if self._jwks is None:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._jwks.keys:
            if key.key_id == kid:
                return key.key
        raise jwt.InvalidTokenError("unknown key id")

    def user_id(self, context: grpc.aio.ServicerContext) -> str:
        """The caller of a gRPC call, from its `authorization` metadata."""
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        return self.user_from_token(bearer_token(header))


def bearer_token(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _reason(error: jwt.InvalidTokenError) -> str:
    # PyJWT's messages name the failed check (audience, issuer, signature…) without echoing the token.
    return str(error) or type(error).__name__


def mint_token(settings: GatewaySettings, user_id: str, ttl_seconds: int) -> str:
    """An HS256 token for `user_id` signed with DUPLEX_JWT_SECRET (for `duplex token`)."""
    if settings.jwt_secret is None:
        raise ValueError("set DUPLEX_JWT_SECRET to mint tokens")
    now = int(time.time())
    claims = {"sub": user_id, "aud": settings.jwt_audience, "iss": settings.jwt_issuer, "iat": now,
              "nbf": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def describe(settings: GatewaySettings) -> str:
    """How the gateway authenticates, for the start-up log (no secrets)."""
    if settings.jwt_jwks_file:
        return f"JWT (JWKS {settings.jwt_jwks_file}, {json.dumps(settings.jwt_algorithms)})"
    if settings.jwt_public_key_file:
        return f"JWT (public key {settings.jwt_public_key_file}, {json.dumps(settings.jwt_algorithms)})"
    if settings.jwt_secret is not None:
        return f"JWT (shared secret, {json.dumps(settings.jwt_algorithms)})"
    return "none"
