"""Measure history_service's CPU per AppendMessage: the real server in its own process, over real gRPC.

Each turn appends what the gateway appends: the user's message (with a client_message_id) and the assistant's
answer (model and tokens, so the daily usage upsert runs too). Turns run in `--concurrency` conversations at
once. The figure is the server process's CPU time (user + system, from /proc) per append, after a warm-up,
over `--rounds` rounds that share the `--appends`.

    .venv/bin/python scripts/bench_history_append.py                  # embedded SQLite in a temporary folder
    .venv/bin/python scripts/bench_history_append.py --database-url postgresql+asyncpg://...  # migrated already
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from duplex.history.v1 import history_pb2, history_pb2_grpc

USER = "bench"
ANSWER = "word " * 48


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line; the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, data_dir: str, database_url: str | None) -> subprocess.Popen:
    env = dict(
        os.environ,
        DUPLEX_HISTORY_LISTEN=f"127.0.0.1:{port}",
        DUPLEX_DATA_DIR=data_dir,
        DUPLEX_LLM_TARGET="127.0.0.1:1",
        DUPLEX_LOG_LEVEL="WARNING",
        # Nothing to poll for here; keep the job worker out of the figure.
        DUPLEX_JOB_POLL_INTERVAL_SECONDS="3600",
    )
    env.pop("DUPLEX_DATABASE_URL", None)
    if database_url:
        env["DUPLEX_DATABASE_URL"] = database_url
    return subprocess.Popen([sys.executable, "-m", "history_service"], env=env)


async def run_turns(stub, conversation_id: str, first_turn: int, turns: int) -> None:
    for turn in range(first_turn, first_turn + turns):
        await stub.AppendMessage(
            history_pb2.AppendMessageRequest(
                user_id=USER,
                conversation_id=conversation_id,
                role=history_pb2.ROLE_USER,
                content=f"question {turn}",
                client_message_id=f"turn-{turn}",
            )
        )
        await stub.AppendMessage(
            history_pb2.AppendMessageRequest(
                user_id=USER,
                conversation_id=conversation_id,
                role=history_pb2.ROLE_ASSISTANT,
                content=ANSWER,
                client_message_id=f"turn-{turn}:answer",
                model="demo",
                prompt_tokens=100,
                completion_tokens=48,
            )
        )


async def all_turns(stub, conversations: list[str], first_turn: int, turns_each: int) -> None:
    await asyncio.gather(*(run_turns(stub, c, first_turn, turns_each) for c in conversations))


async def measure(port: int, pid: int, appends: int, concurrency: int, rounds: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = history_pb2_grpc.HistoryServiceStub(channel)
        conversations = [
            (await stub.CreateConversation(history_pb2.CreateConversationRequest(user_id=USER))).conversation
            for _ in range(concurrency)
        ]
        ids = [conversation.conversation_id for conversation in conversations]
        turns_each = max(1, appends // (2 * concurrency * rounds))
        await all_turns(stub, ids, 0, max(1, turns_each // 5))  # warm-up: caches, compiled statements
        cpu_figures, wall_figures = [], []
        for round_number in range(1, rounds + 1):
            cpu_before, wall_before = cpu_seconds(pid), time.perf_counter()
            await all_turns(stub, ids, round_number * turns_each, turns_each)
            done = 2 * turns_each * concurrency
            cpu_figures.append((cpu_seconds(pid) - cpu_before) * 1e6 / done)
            wall_figures.append((time.perf_counter() - wall_before) * 1e6 / done)
    # The minimum is the figure least disturbed by whatever else the machine was doing.
    print(
        f"{rounds} x {done} appends, concurrency {concurrency}: server CPU us/append min {min(cpu_figures):.0f} "
        f"median {statistics.median(cpu_figures):.0f}; wall us/append min {min(wall_figures):.0f} "
        f"median {statistics.median(wall_figures):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        server = start_server(port, data_dir, args.database_url)
        try:
            asyncio.run(measure(port, server.pid, args.appends, args.concurrency, args.rounds))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
