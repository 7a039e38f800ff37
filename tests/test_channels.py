"""The channels between services: one that lost its peer finds it again soon after it is back."""

import asyncio
import socket
import time

from duplex.common.server import GrpcServer, insecure_channel, is_serving, wait_until_serving


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def started_server(address: str) -> GrpcServer:
    server = GrpcServer((), lambda _: None)
    await server.start(address)
    await server.set_serving(True)
    return server


async def test_a_channel_reconnects_within_about_a_second_after_a_long_outage():
    # grpc's default reconnect backoff grows 1 s x1.6 per attempt up to 120 s: after a 6 s outage the next
    # attempt can be 3+ s away, and every call until then fails although the peer is back (a service that
    # `duplex up` or Kubernetes restarted).
    address = f"127.0.0.1:{free_port()}"
    server = await started_server(address)
    channel = insecure_channel(address)
    try:
        assert await is_serving(channel)
        await server.stop(0)
        outage_ends = time.monotonic() + 6.0
        while time.monotonic() < outage_ends:  # callers keep failing fast meanwhile
            assert not await is_serving(channel, timeout=1.0)
            await asyncio.sleep(0.2)
        server = await started_server(address)
        back = time.monotonic()
        await wait_until_serving(channel, timeout=5.0)
        assert time.monotonic() - back < 1.5
    finally:
        await channel.close()
        await server.stop(0)
