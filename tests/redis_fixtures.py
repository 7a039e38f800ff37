"""A Redis for tests: `redis_url` (session-scoped) and `redis_key_prefix` (unique per test, keys removed after).

With DUPLEX_TEST_REDIS_URL set, that server is used and never flushed: tests only ever touch keys under
their own prefix. Otherwise a throwaway `redis-server` is started from the installed binary on a free
loopback port, without persistence, in a temporary directory, and stopped at the end of the session.
If neither is possible the fixture FAILS: a Redis test that silently skips proves nothing.

Use from a conftest.py: `from tests.redis_fixtures import redis_key_prefix, redis_url`.
"""

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

URL_VARIABLE = "DUPLEX_TEST_REDIS_URL"
START_TIMEOUT_SECONDS = 10.0
START_ATTEMPTS = 3  # a free port can be taken by someone else between picking and binding it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis_server(directory: Path, port: int, binary: str = "redis-server") -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:port, answering PING when this returns (RuntimeError if not)."""
    log = directory / f"redis-{port}.log"
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--logfile", str(log),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if _answers(f"redis://127.0.0.1:{port}/0"):
            return process
        time.sleep(0.05)
    stop_redis_server(process)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"redis-server on port {port} did not answer: {tail}")


def stop_redis_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get(URL_VARIABLE)
    if given:
        if not _answers(given):
            pytest.fail(f"{URL_VARIABLE} is set but that Redis does not answer PING")
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:  # fail, never skip: see the module docstring
        pytest.fail(f"no Redis for the tests: set {URL_VARIABLE} or apt-get install redis-server")
    directory = tmp_path_factory.mktemp("redis")
    errors = []
    for _ in range(START_ATTEMPTS):
        port = free_port()
        try:
            process = start_redis_server(directory, port, binary)
        except RuntimeError as error:
            errors.append(str(error))
            continue
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_redis_server(process)
        return
    pytest.fail("could not start a throwaway redis-server: " + " | ".join(errors))


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A prefix no other test uses; every key under it is deleted after the test."""
    prefix = f"duplex-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
