"""A Redis for tests: `redis_url` (session-scoped) and `redis_key_prefix` (unique per test, keys removed after);
a Redis Cluster of three masters: `redis_cluster_url` and `redis_cluster_key_prefix`.

With DUPLEX_TEST_REDIS_URL (DUPLEX_TEST_REDIS_CLUSTER_URL: any node of a cluster) set, that server is used
and never flushed: tests only ever touch keys under their own prefix. Otherwise throwaway `redis-server`s
are started from the installed binary on free loopback ports, without persistence, in a temporary
directory, and stopped at the end of the session (the cluster: three nodes in cluster mode, the slots split
in three with CLUSTER ADDSLOTSRANGE, joined with CLUSTER MEET). If neither is possible the fixture FAILS: a
Redis test that silently skips proves nothing.

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
CLUSTER_URL_VARIABLE = "DUPLEX_TEST_REDIS_CLUSTER_URL"
CLUSTER_MASTERS = 3
SLOTS = 16384
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


def start_redis_server(
    directory: Path, port: int, binary: str = "redis-server", *, cluster_bus_port: int | None = None
) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:port, answering PING when this returns (RuntimeError if not).
    With cluster_bus_port: a node in cluster mode (no slots yet), its cluster bus on that port."""
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
    if cluster_bus_port is not None:
        command += [
            "--cluster-enabled", "yes",
            "--cluster-port", str(cluster_bus_port),
            "--cluster-config-file", str(directory / f"nodes-{port}.conf"),
            "--cluster-node-timeout", "5000",
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


def start_redis_cluster(directory: Path, binary: str = "redis-server") -> list[tuple[int, subprocess.Popen]]:
    """Three throwaway masters on loopback forming one cluster (every slot covered, state ok on each node)
    when this returns; RuntimeError if they do not. Returns (port, process) per node."""
    nodes: list[tuple[int, subprocess.Popen]] = []
    bus_ports: list[int] = []
    try:
        for _ in range(CLUSTER_MASTERS):
            port, bus_port = free_port(), free_port()
            nodes.append((port, start_redis_server(directory, port, binary, cluster_bus_port=bus_port)))
            bus_ports.append(bus_port)
        clients = [redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port, _ in nodes]
        try:
            for i, client in enumerate(clients):
                first, last = i * SLOTS // CLUSTER_MASTERS, (i + 1) * SLOTS // CLUSTER_MASTERS - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for (port, _), bus_port in zip(nodes[1:], bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while not all(_cluster_ready(client) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster nodes did not agree on a full cluster")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
    except BaseException:
        for _, process in nodes:
            stop_redis_server(process)
        raise
    return nodes


def _cluster_ready(client: redis.Redis) -> bool:
    info = client.cluster("INFO")  # parsed into a dict of strings
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == CLUSTER_MASTERS


def _cluster_answers(url: str) -> bool:
    # RedisClusterException (no node reachable) is not a RedisError.
    try:
        client = redis.RedisCluster.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return False
    finally:
        client.close()


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


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster URL (one node's; the client discovers the rest)."""
    given = os.environ.get(CLUSTER_URL_VARIABLE)
    if given:
        if not _cluster_answers(given):
            pytest.fail(f"{CLUSTER_URL_VARIABLE} is set but that Redis Cluster does not answer PING")
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:  # fail, never skip: see the module docstring
        pytest.fail(f"no Redis Cluster for the tests: set {CLUSTER_URL_VARIABLE} or apt-get install redis-server")
    errors = []
    for _ in range(START_ATTEMPTS):
        directory = tmp_path_factory.mktemp("redis-cluster")
        try:
            nodes = start_redis_cluster(directory, binary)
        except RuntimeError as error:
            errors.append(str(error))
            continue
        try:
            yield f"redis://127.0.0.1:{nodes[0][0]}/0"
        finally:
            for _, process in nodes:
                stop_redis_server(process)
        return
    pytest.fail("could not start a throwaway Redis Cluster: " + " | ".join(errors))


def _unique_prefix() -> str:
    return f"duplex-test:{uuid.uuid4().hex}:"


def delete_keys_under(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for key in keys:  # one by one: on a cluster node the keys lie in many slots
        client.delete(key)


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A prefix no other test uses; every key under it is deleted after the test."""
    prefix = _unique_prefix()
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        delete_keys_under(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_cluster_key_prefix(redis_cluster_url: str) -> Iterator[str]:
    """As redis_key_prefix, on the cluster: the keys under it are deleted from every master after the test."""
    prefix = _unique_prefix()
    yield prefix
    cluster = redis.RedisCluster.from_url(redis_cluster_url)
    try:
        for node in cluster.get_primaries():
            client = redis.Redis(host=node.host, port=node.port)
            try:
                delete_keys_under(client, prefix)
            finally:
                client.close()
    finally:
        cluster.close()
