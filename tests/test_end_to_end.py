"""`duplex up` exactly as a user runs it: four processes on loopback, then grpcurl, the terminal client
and a resumed stream against them, then a clean Ctrl-C."""

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc

SERVICES = {
    "GATEWAY": "duplex.chat.v1.ChatService",
    "LLM": "duplex.llm.v1.LlmService",
    "SESSION": "duplex.session.v1.SessionService",
    "HISTORY": "duplex.history.v1.HistoryService",
}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def running_system(tmp_path):
    ports = {name: free_port() for name in SERVICES}
    env = dict(os.environ)
    env.update({f"DUPLEX_{name}_LISTEN": f"127.0.0.1:{port}" for name, port in ports.items()})
    env["DUPLEX_HTTP_LISTEN"] = f"127.0.0.1:{free_port()}"
    env.update(DUPLEX_DATA_DIR=str(tmp_path / "data"), DUPLEX_LOCAL_TOKENS_PER_SECOND="60",
               DUPLEX_LLM_COALESCE_WINDOW_MS="0")
    env.pop("OPENAI_API_KEY", None)
    launcher = subprocess.Popen(
        [str(BIN / "duplex"), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in launcher.stdout:
        output.append(line)
        if line.startswith("Chat with it"):
            break
    else:
        pytest.fail("duplex up did not start:\n" + "".join(output))
    try:
        yield ports, launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def grpcurl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [shutil.which("grpcurl", path=str(BIN)) or "grpcurl", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_duplex_up_serves_grpcurl_the_terminal_client_and_resume_then_stops_cleanly(running_system):
    ports, launcher = running_system
    gateway = f"127.0.0.1:{ports['GATEWAY']}"

    for name, service in SERVICES.items():
        assert service in grpcurl("-plaintext", f"127.0.0.1:{ports[name]}", "list").split()

    # The README's grpcurl example: open, send, half-close; the whole turn streams back.
    lines = grpcurl(
        "-plaintext", "-d", '{"open":{}} {"message":{"client_message_id":"m1","text":"Hello"}}',
        gateway, "duplex.chat.v1.ChatService/Chat",
    )
    events = [json.loads(chunk)["event"] for chunk in lines.replace("}\n{", "}\x00{").split("\x00")]
    assert "session_opened" in events[0]
    assert "turn_completed" in events[-1]
    assert sum("delta" in e for e in events) >= 40

    one_shot = subprocess.run(
        [str(BIN / "duplex"), "chat", "--target", gateway, "-m", "hello from the terminal"],
        capture_output=True, text=True, timeout=60,
    )
    assert one_shot.returncode == 0, one_shot.stderr
    assert "hello from the terminal" in one_shot.stdout
    assert "tokens/s" in one_shot.stderr

    interactive_ctrl_c_stops_the_answer_then_quits(gateway)
    asyncio.run(chat_cancel_and_resume(gateway))

    launcher.send_signal(signal.SIGINT)
    rest = launcher.stdout.read()
    assert launcher.wait(timeout=30) == 0, rest
    assert "all services stopped" in rest
    assert "Traceback" not in rest
    for port in ports.values():
        with socket.socket() as probe:  # every service process is gone, its port free again
            probe.bind(("127.0.0.1", port))


def read_until(stream, marker: str, timeout: float = 15.0) -> str:
    """Read a pipe until `marker` shows up (fails after `timeout` seconds)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in {seen!r}"
        if select.select([stream], [], [], remaining)[0]:
            chunk = os.read(stream.fileno(), 4096).decode()
            assert chunk, f"pipe closed before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def interactive_ctrl_c_stops_the_answer_then_quits(gateway: str) -> None:
    client = subprocess.Popen(
        [str(BIN / "duplex"), "chat", "--target", gateway],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        read_until(client.stdout, "you> ")
        client.stdin.write("please write a long answer\n")
        client.stdin.flush()
        read_until(client.stdout, "demo model")  # the answer is streaming
        client.send_signal(signal.SIGINT)  # first Ctrl-C: stop the answer
        assert "[stopped after" in read_until(client.stderr, "tokens]")
        read_until(client.stdout, "you> ")
        client.send_signal(signal.SIGINT)  # second Ctrl-C, nothing running: quit
        assert client.wait(timeout=10) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


async def chat_cancel_and_resume(gateway: str) -> None:
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        requests: asyncio.Queue = asyncio.Queue()

        async def request_stream():
            while (request := await requests.get()) is not None:
                yield request

        call = stub.Chat(request_stream())
        await requests.put(chat_pb2.ChatRequest(open=chat_pb2.OpenSession()))
        session_id = (await call.read()).event.session_opened.session_id

        async def turn(text: str, cancel_after_deltas: int | None = None) -> list[chat_pb2.ChatEvent]:
            await requests.put(chat_pb2.ChatRequest(message=chat_pb2.UserMessage(text=text)))
            events = []
            while True:
                event = (await asyncio.wait_for(call.read(), 10)).event
                events.append(event)
                deltas = sum(e.WhichOneof("kind") == "delta" for e in events)
                if cancel_after_deltas is not None and deltas == cancel_after_deltas:
                    await requests.put(chat_pb2.ChatRequest(cancel=chat_pb2.Cancel()))
                if event.WhichOneof("kind") in ("turn_completed", "turn_cancelled", "error"):
                    return events

        assert (await turn("first"))[-1].WhichOneof("kind") == "turn_completed"
        assert (await turn("second"))[-1].WhichOneof("kind") == "turn_completed"
        assert (await turn("third", cancel_after_deltas=2))[-1].WhichOneof("kind") == "turn_cancelled"

        await requests.put(chat_pb2.ChatRequest(message=chat_pb2.UserMessage(text="fourth")))
        seen = []
        while sum(e.WhichOneof("kind") == "delta" for e in seen) < 2:
            seen.append((await call.read()).event)
        call.cancel()  # drop the connection mid-answer

        resumed = stub.ResumeStream(chat_pb2.ResumeStreamRequest(session_id=session_id, after_seq=seen[-1].seq))
        rest = [response.event async for response in resumed]
        assert [e.seq for e in rest] == list(range(seen[-1].seq + 1, seen[-1].seq + 1 + len(rest)))
        assert rest[-1].WhichOneof("kind") == "turn_completed"


class Output:
    """Everything a process wrote to a pipe so far; `wait_for` reads on until a pattern shows up."""

    def __init__(self, stream):
        self._stream = stream
        self.text = ""

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while (match := re.compile(pattern).search(self.text, start)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {pattern!r} in {self.text[start:]!r}"
            if select.select([self._stream], [], [], remaining)[0]:
                chunk = os.read(self._stream.fileno(), 65536).decode()
                assert chunk, f"pipe closed before {pattern!r}: {self.text[start:]!r}"
                self.text += chunk
        return match

    def rest(self) -> str:
        self.text += self._stream.read()
        return self.text


def services_of(launcher: subprocess.Popen) -> dict[str, int]:
    """The launcher's child processes by module (`python -m <module>`)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    found = {}
    for pid in map(int, children):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[argv[argv.index(b"-m") + 1].decode()] = pid
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def answer_after(gateway: str, text: str, within: float) -> float:
    """Seconds until a one-shot chat is answered; it may meet retryable errors for `within` seconds."""
    started = time.monotonic()
    while True:
        answered = subprocess.run([str(BIN / "duplex"), "chat", "--target", gateway, "-m", text],
                                  capture_output=True, text=True, timeout=60)
        waited = time.monotonic() - started
        if answered.returncode == 0:
            assert text in answered.stdout
            return waited
        assert "(retryable)" in answered.stderr and waited < within, answered.stderr


def test_duplex_up_restarts_a_service_that_dies_with_backoff_and_keeps_the_others(running_system):
    ports, launcher = running_system
    gateway = f"127.0.0.1:{ports['GATEWAY']}"
    output = Output(launcher.stdout)
    first = services_of(launcher)
    assert set(first) == {"llm_service", "session_service", "history_service", "gateway"}
    seen_pids = set(first.values())

    def kill_and_see_it_back(module: str, delay: str) -> int:
        pid = services_of(launcher)[module]
        start = len(output.text)
        os.kill(pid, signal.SIGKILL)
        line = output.wait_for(rf"duplex: {module} \(pid {pid}\) exited with signal SIGKILL after [\d.]+s; "
                               rf"restarting it in {delay}s\n", start)
        output.wait_for(rf"duplex: {module} \(pid \d+\) is serving again", line.end())
        assert launcher.poll() is None
        restarted = services_of(launcher)[module]
        assert restarted != pid and alive(restarted)
        seen_pids.add(restarted)
        return restarted

    kill_and_see_it_back("llm_service", "0.5")
    answer_after(gateway, "after the crash", within=3.0)
    kill_and_see_it_back("history_service", "0.5")  # each service backs off on its own
    answer_after(gateway, "after history came back", within=3.0)
    kill_and_see_it_back("llm_service", "1.0")  # crashing again soon: the delay doubles
    answer_after(gateway, "and after two more", within=3.0)
    now = services_of(launcher)
    assert now["gateway"] == first["gateway"] and now["session_service"] == first["session_service"]

    # A stop during a restart's delay restarts nothing; every child ends.
    start = len(output.text)
    os.kill(now["llm_service"], signal.SIGKILL)
    output.wait_for(r"duplex: llm_service .* restarting it in 2.0s\n", start)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0, output.rest()
    rest = output.rest()[start:]
    assert "all services stopped" in rest and "serving again" not in rest
    assert "Traceback" not in output.text
    assert not [pid for pid in seen_pids if alive(pid)]
    for port in ports.values():
        with socket.socket() as probe:  # nothing listens on a service port: no restarted service outlived the stop
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the killed ones left TIME_WAITs
            probe.bind(("127.0.0.1", port))
            probe.listen()
