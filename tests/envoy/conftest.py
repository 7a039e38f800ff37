"""One real system and one Envoy in front of it per test module (Envoy takes ~1 s to start)."""

import pytest
import pytest_asyncio

from tests.conftest import start_system
from tests.envoy.envoy_edge import gateway_http_port, render_config, start_envoy

# The web app origin the rendered config allows (CORS); nothing is served there, tests only send it.
ALLOWED_ORIGIN = "http://app.duplex.test"
# Slow enough that a streamed answer is easy to tell from a buffered one (~2 s per answer).
TOKENS_PER_SECOND = 20.0


@pytest.fixture(scope="module")
def allowed_origin() -> str:
    return ALLOWED_ORIGIN


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge_system(tmp_path_factory):
    system = await start_system(tmp_path_factory.mktemp("envoy-system"), tokens_per_second=TOKENS_PER_SECOND)
    yield system
    await system.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def envoy(edge_system, tmp_path_factory):
    config = render_config(edge_system.gateway.port, gateway_http_port(edge_system), [ALLOWED_ORIGIN])
    running = await start_envoy(config, tmp_path_factory.mktemp("envoy"))
    yield running
    running.stop()
