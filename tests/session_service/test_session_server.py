"""The server around the servicer: health, reflection, and the `python -m session_service` entrypoint."""

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from duplex.common.server import wait_until_serving
from duplex.session.v1 import session_pb2, session_pb2_grpc
from session_service.redis_store import RedisKeys
from tests.redis_fixtures import free_port, start_redis_server, stop_redis_server

SERVICE = "duplex.session.v1.SessionService"
REPO_ROOT = Path(__file__).resolve().parents[2]


async def test_health_reports_serving(service):
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_reflection_lists_the_service(service):
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    replies = await asyncio.wait_for(_collect(call), 5)
    names = {entry.name for entry in replies[0].list_services_response.service}
    assert SERVICE in names and "grpc.health.v1.Health" in names


async def test_stopping_the_server_ends_followers(start_service):
    running = await start_service()
    stub = running.stub
    session = (await stub.OpenSession(session_pb2.OpenSessionRequest(user_id="alice"))).session
    await stub.BeginTurn(session_pb2.BeginTurnRequest(user_id="alice", session_id=session.session_id, turn_id="t"))
    stream = stub.ReadEvents(session_pb2.ReadEventsRequest(user_id="alice", session_id=session.session_id, follow=True))
    reading = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(running.server.stop(0.5), 5)
    # UNAVAILABLE, not a clean end: a clean end would tell the gateway the turn is over, while this tells
    # it to re-attach elsewhere.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(reading, 5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_python_dash_m_serves_and_stops_on_sigterm():
    env = {**os.environ, "DUPLEX_SESSION_LISTEN": "127.0.0.1:0", "DUPLEX_SHUTDOWN_GRACE_SECONDS": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_service", cwd=REPO_ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        port = await asyncio.wait_for(_listening_port(process), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            reply = await stub.OpenSession(session_pb2.OpenSessionRequest(user_id="alice"), timeout=5)
            assert reply.session.user_id == "alice"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _listening_port(process: asyncio.subprocess.Process, seen: list[bytes] | None = None) -> int:
    while line := await process.stderr.readline():
        if seen is not None:
            seen.append(line)
        if match := re.search(rb"listening on port (\d+)", line):
            return int(match.group(1))
    raise AssertionError("session_service exited before listening")


async def _collect(call) -> list:
    return [reply async for reply in call]


async def test_python_dash_m_serves_from_redis_without_logging_its_password(redis_url, redis_key_prefix):
    # Redis' default user has no password, so any password authenticates: enough to see it is not logged.
    url = redis_url.replace("redis://", "redis://default:s3cret-pw@", 1)
    env = {
        **os.environ,
        "DUPLEX_SESSION_LISTEN": "127.0.0.1:0",
        "DUPLEX_SHUTDOWN_GRACE_SECONDS": "0",
        "DUPLEX_REDIS_URL": url,
        "DUPLEX_REDIS_KEY_PREFIX": redis_key_prefix,
        "DUPLEX_HISTORY_TARGET": "",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_service", cwd=REPO_ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        seen: list[bytes] = []
        port = await asyncio.wait_for(_listening_port(process, seen), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            reply = await stub.OpenSession(session_pb2.OpenSessionRequest(user_id="alice"), timeout=5)
        client = redis.Redis.from_url(redis_url)
        try:
            session_key = RedisKeys(redis_key_prefix).of_session(reply.session.session_id)[0]
            assert await asyncio.to_thread(client.exists, session_key)
        finally:
            client.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        logged = b"".join([*seen, await process.stderr.read()]).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "s3cret-pw" not in logged
    assert "redis at redis://default:***@" in logged


# The Redis here is this test's own (started late on purpose), so the backend parameter is moot.
@pytest.mark.parametrize("backend_settings", ["memory"], indirect=True)
async def test_health_is_serving_once_redis_answers(start_service, tmp_path):
    port = free_port()
    service = await start_service(redis_url=f"redis://127.0.0.1:{port}/0", redis_key_prefix="duplex-test-health:")
    health = health_pb2_grpc.HealthStub(service.channel)

    async def status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)).status

    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    redis_server = await asyncio.to_thread(start_redis_server, tmp_path, port)
    try:
        await wait_until_serving(service.channel, SERVICE, timeout=5)
        await service.stub.OpenSession(session_pb2.OpenSessionRequest(user_id="alice"), timeout=5)
    finally:
        await service.server.stop(0)
        await asyncio.to_thread(stop_redis_server, redis_server)
