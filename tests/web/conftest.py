"""Fixtures for the browser edge: an HTTP client, a WebSocket connector, and systems that settle before they
stop."""

import asyncio
import contextlib

import aiohttp
import pytest
import pytest_asyncio
from web_helpers import CHROMIUM, SETTLE_SECONDS, SocketChat, web_url

from tests.conftest import start_system


@contextlib.asynccontextmanager
async def systems(tmp_path):
    """Starts systems on demand; each gets a moment to settle (see web_helpers.py) before all stop."""
    started = []

    async def make(**options):
        system = await start_system(tmp_path / f"data{len(started)}", **options)
        started.append(system)
        return system

    try:
        yield make
    finally:
        if started:
            await asyncio.sleep(SETTLE_SECONDS)
        for system in started:
            await system.stop()


@pytest.fixture
async def make_system(tmp_path):
    """tests/conftest.py's make_system, letting each system settle before it stops."""
    async with systems(tmp_path) as make:
        yield make


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


@pytest.fixture(scope="module")
def chromium() -> str:
    # A missing browser fails the tests: it is a dependency like any other (never downloaded).
    assert CHROMIUM.exists(), "Chromium is missing: apt-get install -y chromium"
    return str(CHROMIUM)


@pytest_asyncio.fixture(loop_scope="module")
async def start(tmp_path):
    """make_system on the browser tests' module event loop (the browser's)."""
    async with systems(tmp_path) as make:
        yield make
