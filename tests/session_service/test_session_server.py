"""The server around the servicer: health, reflection, and the `python -m session_service` entrypoint."""

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from duplex.session.v1 import session_pb2, session_pb2_grpc

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


async def _listening_port(process: asyncio.subprocess.Process) -> int:
    while line := await process.stderr.readline():
        if match := re.search(rb"listening on port (\d+)", line):
            return int(match.group(1))
    raise AssertionError("session_service exited before listening")


async def _collect(call) -> list:
    return [reply async for reply in call]
