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

from duplex.common.errors import Unauthenticated
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Asymmetric and HMAC algorithms we accept; "none" is never among them.
ALLOWED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"})


class Authenticator:
    """Verifies bearer tokens. With no key configured, every caller is `local_user_id`."""

    def __init__(self, settings: GatewaySettings):
        self._settings = settings
        self._algorithms = [a for a in settings.jwt_algorithms if a in ALLOWED_ALGORITHMS]
        self._key = self._load_key(settings)
        self._jwks = self._load_jwks(settings.jwt_jwks_file)
        self.enabled = self._key is not None or self._jwks is not None
        if self.enabled and not self._algorithms:
            raise ValueError("DUPLEX_JWT_ALGORITHMS allows no supported algorithm")

    @staticmethod
    def _load_key(settings: GatewaySettings):
        if settings.jwt_secret is not None:
            return settings.jwt_secret.get_secret_value()
        if settings.jwt_public_key_file is not None:
            return Path(settings.jwt_public_key_file).read_text()
        return None

    @staticmethod
    def _load_jwks(path: Path | None) -> jwt.PyJWKSet | None:
        return jwt.PyJWKSet.from_json(Path(path).read_text()) if path else None

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
            claims = jwt.decode(
                token, self._verification_key(token), algorithms=self._algorithms,
                audience=self._settings.jwt_audience, issuer=self._settings.jwt_issuer,
                leeway=self._settings.jwt_leeway_seconds, options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"invalid token: {_reason(error)}") from None
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
