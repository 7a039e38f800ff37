"""The `duplex` commands other than up/chat: migrate and token."""

import os
import subprocess
import sys
from pathlib import Path

import jwt

DUPLEX = str(Path(sys.executable).parent / "duplex")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([DUPLEX, *args], capture_output=True, text=True, timeout=60, env=environment)


def test_migrate_brings_a_configured_database_to_the_head_revision(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/history.db"
    first = run("migrate", DUPLEX_DATABASE_URL=url)
    assert first.returncode == 0, first.stderr
    assert "at revision" in first.stdout
    again = run("migrate", DUPLEX_DATABASE_URL=url)  # idempotent
    assert again.returncode == 0 and again.stdout == first.stdout


def test_token_mints_a_verifiable_jwt_only_with_a_secret():
    secret = "a-long-enough-secret-for-hs256-signing!"
    minted = run("token", "--user", "alice", "--ttl", "60", DUPLEX_JWT_SECRET=secret)
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), secret, algorithms=["HS256"], audience="duplex", issuer="duplex")
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 60

    environment_without_secret = {k: v for k, v in os.environ.items() if k != "DUPLEX_JWT_SECRET"}
    refused = subprocess.run([DUPLEX, "token", "--user", "x"], capture_output=True, text=True,
                             env=environment_without_secret, timeout=60)
    assert refused.returncode == 1 and "DUPLEX_JWT_SECRET" in refused.stderr
