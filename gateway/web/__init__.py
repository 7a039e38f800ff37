"""The gateway's HTTP edge for browsers: the Chat stream over WebSocket, grpc-web, the web chat page and
/healthz, served by aiohttp on the gateway's own event loop (see edge.py)."""

from gateway.web.edge import WebEdge, start_web_edge

__all__ = ["WebEdge", "start_web_edge"]
