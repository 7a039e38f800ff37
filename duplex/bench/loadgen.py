"""The load generator, run in its own process: N concurrent streams, each sending messages on an
open-loop schedule and timing what comes back. Prints one JSON object with the raw figures.

    python -m duplex.bench.loadgen '{"transport": "grpc", "target": "127.0.0.1:50051", "streams": 100, ...}'
"""

import asyncio
import json
import resource
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field

import grpc

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc

TERMINAL = {"turn_completed", "turn_cancelled", "error"}
TERMINAL_JSON = {"turnCompleted", "turnCancelled", "error"}  # the same kinds in the proto3 JSON mapping
# How long a run may go past its duration for the answers already under way.
OVERRUN_SECONDS = 30


@dataclass
class Figures:
    ttft_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    tokens: int = 0  # the model's own count (a delta may carry several tokens when coalesced)
    deltas: int = 0
    messages: int = 0
    turns: int = 0
    errors: int = 0
    late_sends: int = 0

    def on_event(self, kind: str, event_time: float | None, sent_at: float, first: bool) -> None:
        """`event_time`: when the event was produced (None: unknown, no delivery latency sample)."""
        now = time.time()
        self.messages += 1
        if kind == "delta":
            self.deltas += 1
            if event_time is not None:
                self.delivery_ms.append((now - event_time) * 1000)
            if first:
                self.ttft_ms.append((now - sent_at) * 1000)
        elif kind == "error":
            self.errors += 1


async def grpc_stream(config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    async with grpc.aio.insecure_channel(config["target"]) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        requests: asyncio.Queue = asyncio.Queue(maxsize=4)

        async def request_iterator():
            while (request := await requests.get()) is not None:
                yield request

        call = stub.Chat(request_iterator())
        await requests.put(chat_pb2.ChatRequest(open=chat_pb2.OpenSession()))
        await call.read()

        async def turn(text: str) -> None:
            sent_at = time.time()
            await requests.put(chat_pb2.ChatRequest(message=chat_pb2.UserMessage(
                client_message_id=uuid.uuid4().hex, text=text)))
            first = True
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("stream ended")
                event = response.event
                kind = event.WhichOneof("kind")
                figures.on_event(kind, event.time.ToNanoseconds() / 1e9, sent_at, first and kind == "delta")
                first = first and kind != "delta"
                if kind in TERMINAL and event.turn_id:
                    figures.tokens += event.turn_completed.usage.completion_tokens
                    return

        await run_schedule(turn, config, figures, stop_at, offset)
        await requests.put(None)
        call.cancel()


async def websocket_stream(config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(config["target"]) as socket:
        await socket.send_str(json.dumps({"open": {}}))
        await socket.receive()

        async def turn(text: str) -> None:
            sent_at = time.time()
            await socket.send_str(json.dumps({"message": {"clientMessageId": uuid.uuid4().hex, "text": text}}))
            first = True
            while True:
                frame = await socket.receive()
                if frame.type != aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"socket closed: {frame.type}")
                event = json.loads(frame.data)["event"]
                kind = next(k for k in event if k not in ("seq", "sessionId", "turnId", "time"))
                figures.on_event(kind, _rfc3339(event["time"]), sent_at, first and kind == "delta")
                first = first and kind != "delta"
                if kind in TERMINAL_JSON and event.get("turnId"):
                    figures.tokens += event.get("turnCompleted", {}).get("usage", {}).get("completionTokens", 0)
                    return

        await run_schedule(turn, config, figures, stop_at, offset)


async def grpc_web_stream(config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    import aiohttp

    url = f"{config['target']}/duplex.chat.v1.ChatService/SendMessage"
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    session_id = ""
    async with aiohttp.ClientSession() as http:

        async def turn(text: str) -> None:
            nonlocal session_id
            sent_at = time.time()
            request = chat_pb2.SendMessageRequest(session_id=session_id, message=chat_pb2.UserMessage(
                client_message_id=uuid.uuid4().hex, text=text))
            body = request.SerializeToString()
            async with http.post(url, data=struct.pack(">BI", 0, len(body)) + body, headers=headers) as reply:
                first = True
                buffer = b""
                async for chunk in reply.content.iter_any():
                    buffer += chunk
                    while len(buffer) >= 5:
                        flag, length = struct.unpack(">BI", buffer[:5])
                        if len(buffer) < 5 + length:
                            break
                        payload, buffer = buffer[5:5 + length], buffer[5 + length:]
                        if flag & 0x80:
                            if b"grpc-status:0" not in payload.replace(b" ", b""):
                                figures.errors += 1
                            return
                        event = chat_pb2.SendMessageResponse.FromString(payload).event
                        kind = event.WhichOneof("kind")
                        session_id = session_id or event.session_opened.session_id
                        figures.tokens += event.turn_completed.usage.completion_tokens
                        figures.on_event(kind, event.time.ToNanoseconds() / 1e9, sent_at, first and kind == "delta")
                        first = first and kind != "delta"

        await run_schedule(turn, config, figures, stop_at, offset)


async def llm_direct_stream(config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    """The baseline: the client calls llm_service itself (no gateway, no session, no history)."""
    async with grpc.aio.insecure_channel(config["target"]) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        history: list[llm_pb2.Message] = []

        async def turn(text: str) -> None:
            sent_at = time.time()
            history.append(llm_pb2.Message(role=llm_pb2.ROLE_USER, content=text))
            first = True
            reply = ""
            request = llm_pb2.GenerateRequest(model=config.get("model", ""), messages=history)
            async for response in stub.Generate(request):
                kind = response.WhichOneof("kind")
                if kind == "chunk":
                    reply += response.chunk.text
                    produced = response.chunk.produced_at.ToNanoseconds() / 1e9 or time.time()
                    figures.on_event("delta", produced, sent_at, first)
                    first = False
                else:
                    figures.messages += 1
                    figures.tokens += response.finished.completion_tokens
            history.append(llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content=reply))

        await run_schedule(turn, config, figures, stop_at, offset)


async def openai_direct_stream(config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    """The floor: the client calls the OpenAI-compatible server itself, as llm_service's provider would
    (a streamed chat completion with usage, one kept-alive connection per stream). A chunk carries no
    time it was produced, so this transport has no delivery latency, only TTFT."""
    import aiohttp
    import orjson

    from llm_service.providers.openai_provider import ServerSentEvents

    url = f"{config['target']}/chat/completions"
    history: list[dict] = []
    async with aiohttp.ClientSession() as http:

        async def turn(text: str) -> None:
            sent_at = time.time()
            history.append({"role": "user", "content": text})
            body = {"model": config.get("model", ""), "messages": history, "stream": True,
                    "stream_options": {"include_usage": True}}
            reply = []
            events = ServerSentEvents()  # parsed as llm_service's provider parses them
            async with http.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as answer:
                if answer.status != 200:
                    raise ConnectionError(f"HTTP {answer.status}: {(await answer.text())[:200]}")
                async for received in answer.content.iter_any():
                    for data in events.feed(received):
                        if data == b"[DONE]":
                            break
                        chunk = orjson.loads(data)
                        if chunk.get("usage"):
                            figures.tokens += chunk["usage"]["completion_tokens"]
                        for choice in chunk["choices"]:
                            if content := choice["delta"].get("content"):
                                reply.append(content)
                                figures.on_event("delta", None, sent_at, len(reply) == 1)
            history.append({"role": "assistant", "content": "".join(reply)})

        await run_schedule(turn, config, figures, stop_at, offset)


async def run_schedule(turn, config: dict, figures: Figures, stop_at: float, offset: float) -> None:
    """Open loop: message i is due at start + offset + i * interval, whether or not earlier answers are
    slow; a message whose time came while the previous answer was still streaming is sent late."""
    interval = config["interval_seconds"]
    start = time.monotonic() + offset
    number = 0
    while True:
        due = start + number * interval
        if due >= stop_at:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            figures.late_sends += 1
        await turn(f"benchmark message {number}")
        figures.turns += 1
        number += 1


async def idle_stream(config: dict, opened: asyncio.Event, release: asyncio.Event) -> None:
    """Open a Chat stream with a session and hold it, doing nothing (for memory per idle stream)."""
    async with grpc.aio.insecure_channel(config["target"]) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(_open_then_wait(release))
        await call.read()
        opened.set()
        await release.wait()
        call.cancel()


async def _open_then_wait(release: asyncio.Event):
    yield chat_pb2.ChatRequest(open=chat_pb2.OpenSession())
    await release.wait()


TRANSPORTS = {"grpc": grpc_stream, "ws": websocket_stream, "grpc-web": grpc_web_stream, "llm": llm_direct_stream,
              "openai-direct": openai_direct_stream}


def _rfc3339(text: str) -> float:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromJsonString(text)
    return stamp.ToNanoseconds() / 1e9


async def run_load(config: dict) -> dict:
    figures = Figures()
    streams = config["streams"]
    ramp = config["ramp_seconds"]
    stop_at = time.monotonic() + ramp + config["duration_seconds"]
    worker = TRANSPORTS[config["transport"]]

    async def guarded(index: int) -> None:
        try:
            await worker(config, figures, stop_at, offset=ramp * index / streams)
        except Exception as error:  # one broken stream is a counted error, not the end of the run
            figures.errors += 1
            print(f"stream {index}: {type(error).__name__}: {error}", file=sys.stderr)

    started = time.monotonic()
    streams_done = asyncio.gather(*(guarded(i) for i in range(streams)))
    try:  # an overloaded system must not stretch a run without bound: unfinished streams are errors
        await asyncio.wait_for(streams_done, ramp + config["duration_seconds"] + OVERRUN_SECONDS)
    except TimeoutError:
        figures.errors += 1
        print("run stopped: streams still unfinished after the overrun allowance", file=sys.stderr)
    elapsed = time.monotonic() - started - ramp
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**figures.__dict__, "elapsed_seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "rss_bytes": usage.ru_maxrss * 1024}


async def run_idle(config: dict) -> None:
    """Hold `streams` idle Chat streams until stdin closes; print 'ready' once all are open."""
    release = asyncio.Event()
    opened = [asyncio.Event() for _ in range(config["streams"])]
    tasks = [asyncio.create_task(idle_stream(config, o, release)) for o in opened]
    await asyncio.gather(*(o.wait() for o in opened))
    print(json.dumps({"ready": len(opened)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("mode") == "idle":
        asyncio.run(run_idle(config))
        return
    print(json.dumps(asyncio.run(run_load(config))))


if __name__ == "__main__":
    main()
