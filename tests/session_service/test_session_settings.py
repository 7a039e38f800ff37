"""session_service's Redis Cluster settings: `python -m session_service` serves from a cluster, and refuses
bad settings with one line and exit code 2."""

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis

from duplex.session.v1 import session_pb2, session_pb2_grpc
from session_service.redis_store import RedisKeys
from tests.redis_fixtures import redis_cluster_key_prefix, redis_cluster_url  # noqa: F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parents[2]


async def test_python_dash_m_serves_from_a_redis_cluster(redis_cluster_url, redis_cluster_key_prefix):  # noqa: F811
    env = {key: value for key, value in os.environ.items() if not key.startswith("DUPLEX_")}
    env.update({
        "DUPLEX_SESSION_LISTEN": "127.0.0.1:0",
        "DUPLEX_SHUTDOWN_GRACE_SECONDS": "0",
        "DUPLEX_HISTORY_TARGET": "",
        "DUPLEX_REDIS_URL": redis_cluster_url,
        "DUPLEX_REDIS_CLUSTER": "true",
        "DUPLEX_REDIS_KEY_PREFIX": redis_cluster_key_prefix,
    })
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_service", cwd=REPO_ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        seen: list[bytes] = []
        port = await asyncio.wait_for(_listening_port(process, seen), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            reply = await stub.OpenSession(session_pb2.OpenSessionRequest(user_id="alice"), timeout=5)
        cluster = redis.RedisCluster.from_url(redis_cluster_url)
        try:
            session_key = RedisKeys(redis_cluster_key_prefix).of_session(reply.session.session_id)[0]
            assert await asyncio.to_thread(cluster.exists, session_key)
        finally:
            cluster.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "session store: redis cluster at redis://127.0.0.1:" in b"".join(seen).decode()


async def _listening_port(process: asyncio.subprocess.Process, seen: list[bytes]) -> int:
    while line := await process.stderr.readline():
        seen.append(line)
        if match := re.search(rb"listening on port (\d+)", line):
            return int(match.group(1))
    raise AssertionError("session_service exited before listening")


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"DUPLEX_REDIS_CLUSTER": "maybe"}, "DUPLEX_REDIS_CLUSTER: Input should be a valid boolean"),
        ({"DUPLEX_REDIS_CLUSTER": "true"}, "DUPLEX_REDIS_CLUSTER needs DUPLEX_REDIS_URL"),
        (
            {"DUPLEX_REDIS_CLUSTER": "true", "DUPLEX_REDIS_URL": "redis://:s3cret-pw@127.0.0.1:7000/2"},
            "DUPLEX_REDIS_URL: a Redis Cluster has only database 0",
        ),
        (
            {"DUPLEX_REDIS_CLUSTER": "true", "DUPLEX_REDIS_URL": "unix:///run/redis.sock?password=s3cret-pw"},
            "DUPLEX_REDIS_URL: a Redis Cluster is reached over redis:// or rediss://, not unix://",
        ),
        (
            {"DUPLEX_REDIS_CLUSTER": "1", "DUPLEX_REDIS_URL": "redis://h:7000", "DUPLEX_REDIS_KEY_PREFIX": "{a}"},
            "DUPLEX_REDIS_KEY_PREFIX may not contain { or } on a Redis Cluster",
        ),
    ],
    ids=["not-a-boolean", "no-url", "database", "unix-socket", "braces-in-prefix"],
)
def test_bad_cluster_settings_exit_2_with_one_line(variables, expected):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DUPLEX_")}
    env.update({"DUPLEX_SESSION_LISTEN": "127.0.0.1:0", "DUPLEX_HISTORY_TARGET": "", **variables})
    done = subprocess.run(
        [sys.executable, "-m", "session_service"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"session_service: bad configuration: {expected}")
    assert "s3cret-pw" not in done.stderr
