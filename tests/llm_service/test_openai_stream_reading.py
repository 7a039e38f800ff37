"""How the openai provider reads a streamed chat completion without the SDK's per-chunk objects: the
server-sent events split anywhere, what compatible servers send besides plain chunks, and the HTTP
connection kept for the next request."""

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from pydantic import SecretStr

from duplex.common.errors import Unavailable
from llm_service.providers.base import ChatMessage, Chunk, Finished, GenerationRequest, Role, ToolCallItem
from llm_service.providers.openai_provider import OpenAIModel, OpenAIProvider, ServerSentEvents

REPLY = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b": a comment line\n\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'event: message\r\nid: 7\r\ndata: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def test_events_come_whole_however_the_bytes_are_split():
    whole = ServerSentEvents().feed(REPLY)
    assert len(whole) == 6 and whole[-1] == b"[DONE]"
    for size in (1, 2, 3, 7, 64):
        events = ServerSentEvents()
        pieces = [REPLY[start:start + size] for start in range(0, len(REPLY), size)]
        assert [payload for piece in pieces for payload in events.feed(piece)] == whole


def test_data_lines_of_one_event_are_joined_by_newlines():
    assert ServerSentEvents().feed(b"data: {\ndata:\"a\": 1}\n\n") == [b'{\n"a": 1}']


@pytest.fixture
async def upstream() -> AsyncIterator[dict]:
    """An OpenAI-compatible server whose body is whatever the test puts in `state["body"]`; it notes the
    client port of every request, to tell whether connections are reused."""
    state: dict = {"body": REPLY, "ports": []}

    async def chat(request: web.Request) -> web.StreamResponse:
        state["ports"].append(request.transport.get_extra_info("peername")[1])
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(state["body"])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["base_url"] = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    yield state
    await runner.cleanup()


async def generate(upstream: dict, provider: OpenAIProvider | None = None) -> list:
    provider = provider or provider_for(upstream)
    request = GenerationRequest(model="m", messages=(ChatMessage(Role.USER, "hi"),))
    return [item async for item in provider.generate(request)]


def provider_for(upstream: dict) -> OpenAIProvider:
    return OpenAIProvider([OpenAIModel("m", "upstream-m", SecretStr("sk-test"), upstream["base_url"])])


async def test_a_reply_is_read_into_its_text_and_usage(upstream):
    items = await generate(upstream)
    assert [item.text for item in items if isinstance(item, Chunk)] == ["Hel", "lo"]
    [finished] = [item for item in items if isinstance(item, Finished)]
    assert (finished.prompt_tokens, finished.completion_tokens) == (9, 2)


async def test_tool_call_fragments_come_together(upstream):
    upstream["body"] = (
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1",'
        b'"function":{"name":"calc","arguments":"{\\"a"}}]}}]}\n\n'
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\": 1}"}}]}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    [call] = [item.tool_call for item in await generate(upstream) if isinstance(item, ToolCallItem)]
    assert (call.id, call.name, call.arguments_json) == ("c1", "calc", '{"a": 1}')


@pytest.mark.parametrize("body, message", [
    pytest.param(b'data: {"error":{"message":"overloaded"}}\n\n', "its provider reported an error", id="error event"),
    pytest.param(b"data: {not json\n\n", "could not be read", id="not JSON"),
    pytest.param(b"data: [1, 2]\n\n", "could not be read", id="not an object"),
    pytest.param(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', "stopped before finishing", id="no finish"),
])
async def test_what_is_not_a_finished_reply_is_unavailable(upstream, body, message):
    upstream["body"] = body
    with pytest.raises(Unavailable) as failure:
        await generate(upstream)
    assert message in failure.value.message


async def test_one_connection_serves_request_after_request(upstream):
    provider = provider_for(upstream)
    for _ in range(3):
        await generate(upstream, provider)
    await provider.close()
    assert len(upstream["ports"]) == 3 and len(set(upstream["ports"])) == 1, upstream["ports"]
