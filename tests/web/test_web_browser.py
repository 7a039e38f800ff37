"""The web chat page in a real headless Chromium, driven by Playwright: streaming, Stop, reload-resume and
per-user isolation. Chromium is started once for the module."""

import asyncio
import itertools
import json
import re
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic import SecretStr
from web_helpers import CHROMIUM_FLAGS, SECRET, token, web_url

from duplex.chat.v1 import conversation_pb2, conversation_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

SCREENSHOT = Path("/tmp/duplex-web-page.png")
ANSWER = ".message.assistant"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(chromium):
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def new_page(browser: Browser):
    """Pages in fresh browser contexts (separate storage: separate users); fails on any page error."""
    contexts, errors = [], []

    async def make(system, bearer: str | None = None) -> Page:
        context = await browser.new_context()
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(web_url(system, "/"))
        if bearer:  # the page first asks for a token, then connects with it
            await expect(page.locator("#status")).to_have_attribute("data-state", "error")
            await save_token(page, bearer)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        return page

    yield make
    for context in contexts:
        await context.close()
    assert errors == []


async def save_token(page: Page, bearer: str) -> None:
    if not await page.locator("#token").is_visible():
        await page.locator("#auth summary").click()
    await page.fill("#token", bearer)
    await page.get_by_role("button", name="Save").click()


async def say(page: Page, text: str) -> None:
    await page.fill("#message", text)
    await page.press("#message", "Enter")
    await expect(page.locator(ANSWER).last).to_have_attribute("data-status", "streaming")


async def watch_answer(page: Page, timeout: float = 15.0) -> list[str]:
    """Every distinct text the last answer showed, until it stops streaming."""
    seen: list[str] = []
    answer = page.locator(ANSWER).last
    async with asyncio.timeout(timeout):
        while True:
            text, status = await answer.evaluate("li => [li.querySelector('.text').textContent, li.dataset.status]")
            if not seen or text != seen[-1]:
                seen.append(text)
            if status != "streaming":
                return seen
            await asyncio.sleep(0.03)


async def stored_answer(system, page: Page) -> str:
    """The answer history stored for the page's conversation (over native gRPC)."""
    saved = json.loads(await page.evaluate("localStorage.getItem('duplex.chat')"))
    stub = conversation_pb2_grpc.ConversationServiceStub(system.channel(system.gateway))
    reply = await stub.GetConversation(conversation_pb2.GetConversationRequest(conversation_id=saved["conversationId"]))
    return [m.content for m in reply.messages if m.role == conversation_pb2.MESSAGE_ROLE_ASSISTANT][-1]


async def test_the_page_streams_an_answer_and_lists_the_conversation(start, new_page):
    system = await start(tokens_per_second=15)
    page = await new_page(system)
    await say(page, "Hello from the browser")
    texts = await watch_answer(page)

    assert len([t for t in texts if t]) >= 5  # the answer grew in front of the user, piece by piece
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    await expect(page.locator(ANSWER).last).to_have_attribute("data-status", "done")
    assert texts[-1] == await stored_answer(system, page)
    listed = page.locator("#conversations li")
    await expect(listed).to_have_count(1)  # the session's conversation, now holding the exchange
    await expect(listed).to_contain_text("2 messages")
    await expect(listed).to_have_attribute("aria-current", "true")
    await page.screenshot(path=str(SCREENSHOT), full_page=True)


async def test_stop_cancels_the_running_answer(start, new_page):
    system = await start(tokens_per_second=15)
    page = await new_page(system)
    await say(page, "Stop me from the browser")
    await expect(page.locator(f"{ANSWER} .text").last).not_to_have_text("")
    await page.get_by_role("button", name="Stop").click()

    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-status", "stopped")
    await expect(answer.locator(".meta")).to_have_text("Stopped")
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert await answer.locator(".text").text_content() == await stored_answer(system, page)


async def test_a_reload_resumes_the_running_answer(start, new_page):
    system = await start(tokens_per_second=15)
    page = await new_page(system)
    await say(page, "Keep going across a reload")
    text = page.locator(f"{ANSWER} .text").last
    await expect(text).to_have_text(re.compile(r"^(\S+\s+){4}"))  # a few words in
    before = await text.text_content()

    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator(ANSWER).last).to_have_attribute("data-status", "done", timeout=15_000)
    after = await page.locator(f"{ANSWER} .text").last.text_content()

    assert await page.locator(ANSWER).count() == 1  # the same answer went on; no second turn
    assert after.startswith(before) and len(after) > len(before)
    assert after == await stored_answer(system, page)  # nothing missed, nothing repeated


async def test_each_user_sees_only_their_own_conversations(start, new_page, browser):
    system = await start(jwt_secret=SecretStr(SECRET))

    alice = await browser.new_page()
    await alice.goto(web_url(system, "/"))
    await expect(alice.locator("#status")).to_have_attribute("data-state", "error")
    await expect(alice.get_by_role("alert")).to_contain_text("token")  # asked to sign in
    await save_token(alice, token("alice"))
    await expect(alice.locator("#status")).to_have_attribute("data-state", "connected")
    await say(alice, "Alice's secret plan")
    await expect(alice.locator(ANSWER).last).to_have_attribute("data-status", "done")
    await expect(alice.locator("#conversations li")).to_have_count(1)
    alice_state = await alice.evaluate("localStorage.getItem('duplex.chat')")
    alice_conversation = json.loads(alice_state)["conversationId"]

    bob = await new_page(system, token("bob"))
    await expect(bob.locator("#conversations li")).to_have_count(1)  # his own new, empty one
    assert alice_conversation not in await conversation_ids(bob)
    # Even holding Alice's session id, Bob gets a fresh session of his own and none of her words.
    await bob.evaluate("state => localStorage.setItem('duplex.chat', state)", alice_state)
    await bob.reload()
    await expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(bob.locator(".message")).to_have_count(0)
    await expect(bob.locator("#conversations li")).to_have_count(2)  # both his
    assert alice_conversation not in await conversation_ids(bob)
    assert "secret plan" not in await bob.content()
    await alice.context.close()


async def conversation_ids(page: Page) -> list[str]:
    return await page.locator("#conversations li").evaluate_all("items => items.map(li => li.dataset.conversationId)")
