"""session_service's start-up refuses bad settings with one line and exit code 2 (the Redis Cluster ones here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


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
