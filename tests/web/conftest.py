"""Fixtures for the browser edge: an HTTP client, a WebSocket connector, and systems that settle before they
stop."""

import asyncio
import contextlib

import aiohttp
import pytest
from web_helpers import SETTLE_SECONDS, SocketChat, web_url

from tests.conftest import start_system


@pytest.fixture
async def make_system(tmp_path):
    """tests/conftest.py's make_system, letting each system settle before it stops."""
    started = []

    async def make(**options):
        system = await start_system(tmp_path / f"data{len(started)}", **options)
        started.append(system)
        return system

    yield make
    if started:
        await asyncio.sleep(SETTLE_SECONDS)
    for system in started:
        await system.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def connect(http):
    """`async with connect(system, protocols=..., headers=...) as chat:` a SocketChat on /v1/chat."""

    @contextlib.asynccontextmanager
    async def open_socket(system, protocols=("duplex.v1",), headers=None, **options):
        async with http.ws_connect(
            web_url(system, "/v1/chat"), protocols=protocols, headers=headers, **options
        ) as ws:
            yield SocketChat(ws)

    return open_socket
