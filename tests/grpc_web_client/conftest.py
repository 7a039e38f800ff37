"""Per module: the bundled client, a page server on its own origin, headless Chromium, a real system whose
gateway allows that origin, and the shipped Envoy in front of it."""

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import async_playwright

from tests.conftest import start_system
from tests.envoy.envoy_edge import gateway_http_port, render_config, start_envoy
from tests.grpc_web_client.client_build import PAGE, build_client

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Slow enough that a streamed answer is easy to tell from a buffered one (~2 s per answer).
TOKENS_PER_SECOND = 20.0


@pytest.fixture(scope="module")
def client_bundle(tmp_path_factory):
    return build_client(tmp_path_factory.mktemp("grpc-web-client"))


def file_handler(path):
    async def handler(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)

    return handler


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page_origin(client_bundle):
    """Serves the test page and the bundle; its origin differs from Envoy's and the gateway's (CORS)."""
    app = web.Application()
    app.router.add_get("/", file_handler(PAGE))
    app.router.add_get("/client.js", file_handler(client_bundle))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser, page_origin):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(page_origin)
    await page.wait_for_function("() => window.duplex !== undefined")
    yield page
    await context.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web_system(tmp_path_factory, page_origin):
    system = await start_system(
        tmp_path_factory.mktemp("grpc-web-system"), tokens_per_second=TOKENS_PER_SECOND, allowed_origins=[page_origin]
    )
    yield system
    await system.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def envoy(web_system, page_origin, tmp_path_factory):
    config = render_config(web_system.gateway.port, gateway_http_port(web_system), [page_origin])
    running = await start_envoy(config, tmp_path_factory.mktemp("envoy"))
    yield running
    running.stop()
