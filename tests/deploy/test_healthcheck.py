"""deploy/grpc_healthcheck.py (the image's duplex-healthcheck) against a real gRPC health server."""

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.deploy_files import HEALTHCHECK_SCRIPT


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("duplex.up.v1.Up", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("duplex.down.v1.Down", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def healthcheck(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), *arguments], capture_output=True, text=True, timeout=20, check=False
    )


def test_serving_service_passes(health_server):
    result = healthcheck(health_server, "duplex.up.v1.Up")
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_whole_server_is_the_default(health_server):
    assert healthcheck(health_server).returncode == 0


def test_not_serving_service_fails(health_server):
    result = healthcheck(health_server, "duplex.down.v1.Down")
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_unknown_service_fails(health_server):
    result = healthcheck(health_server, "duplex.nope.v1.Nope")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_nothing_listening_fails_within_the_timeout(health_server):
    closed = health_server.rpartition(":")[0] + ":1"
    result = healthcheck(closed, "duplex.up.v1.Up", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
