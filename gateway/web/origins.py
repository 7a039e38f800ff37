"""Which browser origins may use the HTTP edge, and the CORS headers that tell the browser so.

Browsers send `Origin` on WebSocket upgrades, on cross-origin requests and on every POST. A request from a
page whose origin is not allowed is refused (HTTP 403) before it does anything: a cross-site page must not
drive a user's chat or read their conversations. Requests without `Origin` come from non-browser clients,
which CORS does not concern; they are allowed (authentication still applies).
"""

from collections.abc import Iterable

from aiohttp import web

# What grpc-web clients (grpc-web, Connect-ES) send, and what they must be able to read.
ALLOWED_HEADERS = "content-type, x-grpc-web, x-user-agent, authorization, grpc-timeout"
EXPOSED_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin"
ALLOWED_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE_SECONDS = "600"


def own_origins(port: int) -> list[str]:
    """The page's own origins when served on loopback: only these, by default, so a DNS-rebinding page
    (another name resolving to 127.0.0.1) is refused."""
    return [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]


def normalize(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class OriginPolicy:
    def __init__(self, origins: Iterable[str]):
        self._allowed = frozenset(normalize(origin) for origin in origins)

    def allows(self, origin: str | None) -> bool:
        return origin is None or normalize(origin) in self._allowed

    def middleware(self):
        """Refuse disallowed origins with 403 and answer CORS preflights."""

        @web.middleware
        async def check_origin(request: web.Request, handler):
            origin = request.headers.get("Origin")
            if not self.allows(origin):
                raise web.HTTPForbidden(text="origin not allowed\n")
            preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
            if origin is not None and preflight:
                return web.Response(status=204, headers=self.preflight_headers(origin))
            return await handler(request)

        return check_origin

    def preflight_headers(self, origin: str) -> dict[str, str]:
        return {
            **self.response_headers(origin),
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_SECONDS,
        }

    @staticmethod
    def response_headers(origin: str) -> dict[str, str]:
        # Bearer tokens, not cookies, so no Allow-Credentials.
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every response to an allowed cross-origin page, streaming ones included (their
        headers go out before the handler returns, so a middleware would be too late)."""
        origin = request.headers.get("Origin")
        if origin is not None and self.allows(origin):
            response.headers.update(self.response_headers(origin))
