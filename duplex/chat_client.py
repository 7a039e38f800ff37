"""`duplex chat`: a terminal client on the bidi Chat stream.

Interactive: type a line to send it; Ctrl-C stops the answer being written, a second Ctrl-C quits.
One-shot (`-m TEXT`): prints the answer and exits 0, or 1 when the turn ends in an error.
"""

import asyncio
import os
import signal
import sys
import threading
import uuid

import grpc

from duplex.chat.v1 import chat_pb2, chat_pb2_grpc
from duplex.common.server import insecure_channel

DEFAULT_TARGET = "127.0.0.1:50051"


class TerminalChat:
    def __init__(self, args):
        self._args = args
        self._requests: asyncio.Queue[chat_pb2.ChatRequest | None] = asyncio.Queue(maxsize=64)
        self._turn_running = False
        self._turn_ended = asyncio.Event()
        self._quit = asyncio.Event()
        self.failed = False

    async def _request_stream(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def send_message(self, text: str) -> None:
        self._turn_ended.clear()
        self._turn_running = True
        message = chat_pb2.UserMessage(client_message_id=uuid.uuid4().hex, text=text)
        await self._requests.put(chat_pb2.ChatRequest(message=message))

    def on_interrupt(self) -> None:
        """First Ctrl-C during an answer stops it; otherwise Ctrl-C quits."""
        if self._turn_running:
            self._turn_running = False
            self._requests.put_nowait(chat_pb2.ChatRequest(cancel=chat_pb2.Cancel()))
            print("\n[stopping…]", file=sys.stderr, flush=True)
        else:
            self._quit.set()

    async def run(self, channel: grpc.aio.Channel) -> int:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        a = self._args
        await self._requests.put(chat_pb2.ChatRequest(open=chat_pb2.OpenSession(
            session_id=a.session, conversation_id=a.conversation, model=a.model, system_prompt=a.system,
        )))
        call = stub.Chat(self._request_stream())
        printer = asyncio.create_task(self._print_events(call))
        try:
            if a.message is not None:
                await self.send_message(a.message)
                await _first(self._turn_ended.wait(), self._quit.wait(), printer)
            else:
                await _first(self._interactive(), self._quit.wait(), printer)
        finally:
            await self._requests.put(None)
            call.cancel()
            printer.cancel()
            await asyncio.gather(printer, return_exceptions=True)
        if printer.done() and not printer.cancelled() and printer.exception():
            raise printer.exception()
        return 1 if self.failed else 0

    async def _interactive(self) -> None:
        lines = _stdin_lines()
        while True:
            if self._turn_running:
                await self._turn_ended.wait()
            print("you> ", end="", flush=True)
            line = await lines.get()
            if line is None:
                return
            if line.strip():
                await self.send_message(line)

    async def _print_events(self, call) -> None:
        async for response in call:
            self._show(response.event)

    def _show(self, event: chat_pb2.ChatEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "session_opened":
            opened = event.session_opened
            state = "resumed" if opened.resumed else "new"
            print(f"[session {opened.session_id} ({state}), conversation {opened.conversation_id}]",
                  file=sys.stderr, flush=True)
        elif kind == "turn_started":
            print("assistant> ", end="", flush=True)
        elif kind == "delta":
            print(event.delta.text, end="", flush=True)
        elif kind == "turn_completed":
            done = event.turn_completed
            ttft = done.time_to_first_token.ToMilliseconds()
            print(f"\n[{done.usage.completion_tokens} tokens, first token {ttft} ms, "
                  f"{done.tokens_per_second:.0f} tokens/s]", file=sys.stderr, flush=True)
            self._end_turn()
        elif kind == "turn_cancelled":
            print(f"\n[stopped after {event.turn_cancelled.usage.completion_tokens} tokens]",
                  file=sys.stderr, flush=True)
            self._end_turn()
        elif kind == "error":
            print(f"\n{error_line(event.error)}", file=sys.stderr, flush=True)
            self.failed = True
            if self._turn_running or event.turn_id:
                self._end_turn()
        elif kind == "message_accepted" and event.message_accepted.duplicate:
            print("[duplicate message: already answered]", file=sys.stderr, flush=True)
            self._end_turn()

    def _end_turn(self) -> None:
        self._turn_running = False
        self._turn_ended.set()


def error_line(error: chat_pb2.ChatError) -> str:
    retry = " (retryable)" if error.retryable else ""
    return f"[error {grpc.StatusCode(_code(error.code)).name}: {error.message}{retry}]"


def _code(number: int):
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN).value


def _stdin_lines() -> asyncio.Queue:
    """Lines from stdin, read on a daemon thread (None at end of input)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True, name="stdin").start()
    return lines


async def _first(*awaitables) -> None:
    """Wait for the first to finish; cancel the others, except tasks the caller owns."""
    owned = [a for a in awaitables if isinstance(a, asyncio.Future)]
    created = [asyncio.ensure_future(a) for a in awaitables if not isinstance(a, asyncio.Future)]
    try:
        await asyncio.wait([*owned, *created], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in created:
            task.cancel()
        await asyncio.gather(*created, return_exceptions=True)


async def run(args) -> int:
    target = args.target or os.environ.get("DUPLEX_GATEWAY_TARGET", DEFAULT_TARGET)
    chat = TerminalChat(args)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, chat.on_interrupt)
    async with insecure_channel(target) as channel:
        try:
            return await chat.run(channel)
        except grpc.aio.AioRpcError as error:
            print(f"duplex chat: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
