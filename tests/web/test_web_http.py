"""The plain HTTP routes of the edge: the page, /healthz and the conversations JSON endpoint."""

import asyncio

from pydantic import SecretStr
from web_helpers import SECRET, token, web_url


async def test_the_page_and_its_files_are_served_with_a_strict_policy(make_system, http):
    system = await make_system()
    async with http.get(web_url(system, "/")) as page:
        assert page.status == 200
        assert page.content_type == "text/html"
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        assert '<script type="module" src="/static/app.js">' in await page.text()
    for path in ("/static/app.js", "/static/style.css"):
        async with http.get(web_url(system, path)) as asset:
            assert asset.status == 200, path
    async with http.get(web_url(system, "/static/../settings.py")) as escape:
        assert escape.status in (403, 404)


async def test_healthz_follows_the_gateways_grpc_health(make_system, http):
    system = await make_system(dependency_check_interval_seconds=0.1)
    async with http.get(web_url(system, "/healthz")) as healthy:
        assert healthy.status == 200
        assert await healthy.text() == "SERVING\n"
    await system.history.stop(0)  # an inner service goes away: the gateway stops SERVING
    for _ in range(100):
        async with http.get(web_url(system, "/healthz")) as health:
            if health.status == 503:
                break
        await asyncio.sleep(0.05)
    assert health.status == 503


async def test_the_conversations_endpoint_lists_the_callers_own(make_system, http):
    system = await make_system(jwt_secret=SecretStr(SECRET))
    async with http.get(web_url(system, "/v1/conversations")) as anonymous:
        assert anonymous.status == 401
        assert (await anonymous.json())["status"] == "UNAUTHENTICATED"
    async with http.get(web_url(system, "/v1/conversations?pageSize=x")) as bad:
        assert bad.status == 400
    alice = {"Authorization": f"Bearer {token('alice')}"}
    async with http.get(web_url(system, "/v1/conversations"), headers=alice) as listed:
        assert listed.status == 200
        assert await listed.json() == {}  # proto3 JSON leaves an empty list out
