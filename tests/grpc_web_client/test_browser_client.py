"""A Connect-ES grpc-web client in headless Chromium, from a page on another origin: through Envoy, and
straight to the gateway's own grpc-web endpoint."""

import pytest

from tests.envoy.envoy_edge import gateway_http_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

TURN_SHAPE = ["sessionOpened", "messageAccepted", "turnStarted", "delta", "turnCompleted"]
USER, ASSISTANT = 1, 2  # duplex.chat.v1.MessageRole, as Connect-ES hands enums to the page


def shape(kinds: list[str]) -> list[str]:
    """The kinds in order with runs of deltas folded into one, ignoring quota updates."""
    folded: list[str] = []
    for kind in kinds:
        if kind != "quota" and not (kind == "delta" and folded and folded[-1] == "delta"):
            folded.append(kind)
    return folded


async def send_message(page, base_url: str, text: str) -> dict:
    return await page.evaluate("([url, text]) => window.duplex.sendMessage(url, text)", [base_url, text])


async def get_conversation(page, base_url: str, conversation_id: str) -> dict:
    return await page.evaluate("([url, id]) => window.duplex.getConversation(url, id)", [base_url, conversation_id])


def assert_whole_turn_streamed(state: dict, text: str) -> str:
    """Every event of the turn arrived, the words arrived as they were written; returns the conversation id."""
    assert state["error"] is None, state["error"]
    events = state["events"]
    kinds = [event["kind"] for event in events]
    assert shape(kinds) == TURN_SHAPE
    assert kinds.count("delta") >= 5
    assert text in "".join(event["text"] for event in events)
    # Page clock, in ms: at 20 tokens/s the first words are on screen well before the answer ends.
    first_delta = events[kinds.index("delta")]["at"]
    completed = events[kinds.index("turnCompleted")]["at"]
    assert completed - first_delta > 1000
    return events[0]["conversationId"]


async def assert_turn_and_conversation(page, base_url: str, text: str) -> None:
    conversation_id = assert_whole_turn_streamed(await send_message(page, base_url, text), text)
    state = await get_conversation(page, base_url, conversation_id)
    assert state["error"] is None, state["error"]
    assert state["conversation"]["roles"] == [USER, ASSISTANT]


async def test_browser_streams_a_turn_through_envoy(page, envoy):
    await assert_turn_and_conversation(page, envoy.url, "hello from chromium via envoy")


async def test_browser_streams_a_turn_from_the_gateway_grpc_web_endpoint(page, web_system):
    gateway_url = f"http://127.0.0.1:{gateway_http_port(web_system)}"
    await assert_turn_and_conversation(page, gateway_url, "hello from chromium via the gateway")
