"""Scaling out for real: Envoy in front of two gateway processes that share Redis and PostgreSQL.

SIGKILL one gateway while answers stream through it: every affected client reconnects through Envoy,
lands on the survivor and resumes; the survivor ends each turn the dead gateway left behind with a
retryable error and keeps its partial text as interrupted. SIGTERM (a rolling update) loses nothing.
"""

import asyncio
import os
import signal
import socket
import sys
import uuid

import grpc
import pytest

from duplex import launcher
from duplex.chat.v1 import chat_pb2, chat_pb2_grpc, conversation_pb2, conversation_pb2_grpc
from history_service.migrate import migrate
from history_service.settings import HistorySettings
from tests.envoy.envoy_edge import render_config, start_envoy
from tests.postgres_fixtures import postgres_databases, postgres_url  # noqa: F401 - fixtures
from tests.redis_fixtures import redis_key_prefix, redis_url  # noqa: F401 - fixtures

CLIENTS = 6
TOKENS_PER_SECOND = 10  # answers of ~45 tokens take ~4.5 s: long enough to kill a gateway mid-answer
TERMINAL = ("turn_completed", "turn_cancelled", "error")
SPECS = {spec.module: spec for spec in launcher.SERVICES}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """llm, session (Redis), history (PostgreSQL) and two gateways as processes, Envoy in front."""

    def __init__(self, redis: str, prefix: str, database: str):
        self.ports = {name: free_port() for name in ("llm", "session", "history", "a", "a_http", "b", "b_http")}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DUPLEX_", "OPENAI_"))}
        base.update(
            DUPLEX_LLM_TARGET=f"127.0.0.1:{self.ports['llm']}",
            DUPLEX_SESSION_TARGET=f"127.0.0.1:{self.ports['session']}",
            DUPLEX_HISTORY_TARGET=f"127.0.0.1:{self.ports['history']}",
            DUPLEX_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
        )
        self.base = base
        self.env = {
            "llm_service": {**base, "DUPLEX_LLM_LISTEN": f"127.0.0.1:{self.ports['llm']}",
                            "DUPLEX_LOCAL_TOKENS_PER_SECOND": str(TOKENS_PER_SECOND),
                            "DUPLEX_LLM_COALESCE_WINDOW_MS": "0"},
            "session_service": {**base, "DUPLEX_SESSION_LISTEN": f"127.0.0.1:{self.ports['session']}",
                                "DUPLEX_REDIS_URL": redis, "DUPLEX_REDIS_KEY_PREFIX": prefix,
                                "DUPLEX_TURN_LEASE_SECONDS": "2", "DUPLEX_QUOTA_MESSAGES_PER_MINUTE": "0"},
            "history_service": {**base, "DUPLEX_HISTORY_LISTEN": f"127.0.0.1:{self.ports['history']}",
                                "DUPLEX_DATABASE_URL": database},
        }
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.envoy = None

    def gateway_env(self, name: str) -> dict[str, str]:
        return {**self.base, "DUPLEX_GATEWAY_LISTEN": f"127.0.0.1:{self.ports[name]}",
                "DUPLEX_HTTP_LISTEN": f"127.0.0.1:{self.ports[name + '_http']}",
                "DUPLEX_TURN_LEASE_RENEW_SECONDS": "0.5", "DUPLEX_SHUTDOWN_GRACE_SECONDS": "15"}

    async def start(self, name: str, module: str, env: dict[str, str]) -> None:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", module, env=env)
        self.processes[name] = process
        await launcher.wait_serving(SPECS[module], process, env, 60)

    async def __aenter__(self) -> "Cluster":
        for module in ("llm_service", "session_service", "history_service"):
            await self.start(module, module, self.env[module])
        for name in ("a", "b"):
            await self.start(name, "gateway", self.gateway_env(name))
        config = render_config(self.ports["a"], self.ports["a_http"], ["http://test.invalid"])
        for cluster in config["static_resources"]["clusters"]:
            port_key = "" if cluster["name"] == "gateway_grpc" else "_http"
            endpoints = cluster["load_assignment"]["endpoints"][0]
            endpoints["lb_endpoints"] = [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": self.ports[g + port_key]}}}}
                for g in ("a", "b")
            ]
        self.envoy = await start_envoy(config, self.work_dir)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for process in reversed(list(self.processes.values())):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.envoy.port}"


class Client:
    """One user's Chat stream through Envoy, which reconnects and resumes when its gateway goes away."""

    def __init__(self, edge: str):
        self.edge = edge
        self.events: list[chat_pb2.ChatEvent] = []
        self.session_id = ""
        self.conversation_id = ""
        self.reconnected = False

    async def start_turn(self, first_deltas: int = 3) -> None:
        self.channel = grpc.aio.insecure_channel(self.edge)
        requests: asyncio.Queue = asyncio.Queue()

        async def request_iterator():
            while (request := await requests.get()) is not None:
                yield request

        self.call = chat_pb2_grpc.ChatServiceStub(self.channel).Chat(request_iterator())
        await requests.put(chat_pb2.ChatRequest(open=chat_pb2.OpenSession()))
        opened = (await self.call.read()).event.session_opened
        self.session_id, self.conversation_id = opened.session_id, opened.conversation_id
        text = f"a long answer please ({uuid.uuid4().hex[:6]})"
        await requests.put(chat_pb2.ChatRequest(message=chat_pb2.UserMessage(client_message_id="m1", text=text)))
        while sum(e.WhichOneof("kind") == "delta" for e in self.events) < first_deltas:
            self.events.append((await self.call.read()).event)

    async def finish_turn(self) -> None:
        """Read to the turn's end; if the gateway goes away, reconnect through Envoy and resume."""
        try:
            while not self.events or not self._ended():
                response = await asyncio.wait_for(self.call.read(), 30)
                if response is grpc.aio.EOF:
                    raise ConnectionError("stream ended")
                if response.event.seq:  # ephemeral events (the goodbye) are not part of the turn
                    self.events.append(response.event)
        except (grpc.aio.AioRpcError, ConnectionError):
            await self.channel.close()
            self.reconnected = True
            await self._resume()
        else:
            self.call.cancel()
            await self.channel.close()

    async def _resume(self) -> None:
        for _attempt in range(40):  # Envoy needs a moment to stop routing to a dead gateway
            try:
                async with grpc.aio.insecure_channel(self.edge) as channel:
                    request = chat_pb2.ResumeStreamRequest(session_id=self.session_id, after_seq=self.events[-1].seq)
                    async for response in chat_pb2_grpc.ChatServiceStub(channel).ResumeStream(request, timeout=30):
                        self.events.append(response.event)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.25)
        pytest.fail("could not resume through Envoy")

    def _ended(self) -> bool:
        last = self.events[-1]
        return last.WhichOneof("kind") in TERMINAL and bool(last.turn_id)

    def text(self) -> str:
        return "".join(e.delta.text for e in self.events if e.WhichOneof("kind") == "delta")


async def stored_answer(edge: str, conversation_id: str) -> conversation_pb2.Message:
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = conversation_pb2_grpc.ConversationServiceStub(channel)
        reply = await stub.GetConversation(conversation_pb2.GetConversationRequest(conversation_id=conversation_id))
    return reply.messages[-1]


def assert_each_event_once(client: Client) -> None:
    seqs = [e.seq for e in client.events]
    assert seqs == sorted(set(seqs)), f"duplicated or out-of-order events: {seqs}"
    assert all(e.turn_id == client.events[0].turn_id for e in client.events)


@pytest.fixture
async def cluster(redis_url, redis_key_prefix, postgres_databases, tmp_path):  # noqa: F811
    database = postgres_databases.create()
    await migrate(HistorySettings(database_url=database))
    running = Cluster(redis_url, redis_key_prefix, database)
    running.work_dir = tmp_path / "envoy"
    async with running:
        yield running


async def run_clients(cluster: Cluster) -> list[Client]:
    clients = [Client(cluster.edge) for _ in range(CLIENTS)]
    await asyncio.gather(*(client.start_turn() for client in clients))
    return clients


async def test_a_killed_gateway_loses_no_completed_turn_and_its_turns_end_on_the_survivor(cluster):
    clients = await run_clients(cluster)
    cluster.processes["a"].kill()  # SIGKILL: no goodbye, no flush, no EndTurn
    await asyncio.gather(*(client.finish_turn() for client in clients))

    affected = [c for c in clients if c.reconnected]
    survivors = [c for c in clients if not c.reconnected]
    assert affected and survivors, "Envoy should have spread the streams over both gateways"
    for client in clients:
        assert_each_event_once(client)
    for client in survivors:
        assert client.events[-1].WhichOneof("kind") == "turn_completed"
        stored = await stored_answer(cluster.edge, client.conversation_id)
        assert stored.status == conversation_pb2.MESSAGE_STATUS_COMPLETE
        assert stored.content == client.text()
    for client in affected:
        end = client.events[-1]
        assert end.WhichOneof("kind") == "error" and end.error.retryable
        assert end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        stored = await stored_answer(cluster.edge, client.conversation_id)
        assert stored.status == conversation_pb2.MESSAGE_STATUS_INTERRUPTED, (client.events[-3:], len(client.events))
        # What the log had when the gateway died; the client may have seen a few tokens more.
        assert stored.content and client.text().startswith(stored.content)

    # The affected sessions are not stuck: the next message is answered by the survivor.
    async with grpc.aio.insecure_channel(cluster.edge) as channel:
        request = chat_pb2.SendMessageRequest(session_id=affected[0].session_id,
                                              message=chat_pb2.UserMessage(client_message_id="m2", text="again"))
        events = [r.event async for r in chat_pb2_grpc.ChatServiceStub(channel).SendMessage(request, timeout=30)]
    assert events[-1].WhichOneof("kind") == "turn_completed"


async def test_a_gateway_stopped_with_sigterm_finishes_its_turns_and_loses_nothing(cluster):
    clients = await run_clients(cluster)
    cluster.processes["a"].send_signal(signal.SIGTERM)  # a rolling update
    await asyncio.gather(*(client.finish_turn() for client in clients))
    assert await asyncio.wait_for(cluster.processes["a"].wait(), 30) == 0

    for client in clients:
        assert_each_event_once(client)
        assert client.events[-1].WhichOneof("kind") == "turn_completed", client.events[-1]
        stored = await stored_answer(cluster.edge, client.conversation_id)
        assert stored.status == conversation_pb2.MESSAGE_STATUS_COMPLETE
        assert stored.content == client.text()


async def test_a_resume_through_the_other_gateway_follows_the_running_turn_exactly_once(cluster):
    # Talk to gateway a directly, drop the connection mid-answer, resume through gateway b.
    client = Client(f"127.0.0.1:{cluster.ports['a']}")
    await client.start_turn()
    client.call.cancel()
    await client.channel.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.ports['b']}") as channel:
        request = chat_pb2.ResumeStreamRequest(session_id=client.session_id, after_seq=client.events[-1].seq)
        rest = [r.event async for r in chat_pb2_grpc.ChatServiceStub(channel).ResumeStream(request, timeout=30)]
    assert rest[0].seq == client.events[-1].seq + 1
    client.events += rest
    seqs = [e.seq for e in client.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # every event once, none missing
    assert rest[-1].WhichOneof("kind") == "turn_completed"
    stored = await stored_answer(cluster.edge, client.conversation_id)
    assert stored.content == client.text()
