"""The web page in a real browser: Debian's Chromium driven by Playwright, against a live server.

Needs `pip install playwright` (the dev extra) and `apt-get install -y chromium`; Playwright's own
browser download (`playwright install`) is not used. Set TINYSTORIES_SCREENSHOT_DIR to keep a
screenshot of the page after a story has streamed in.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect

from serve_fakes import FakeLanguageModel, expected_pieces  # noqa: E402

from tinystories.config import SamplingConfig  # noqa: E402
from tinystories.serve import BackgroundServer, create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                reason=f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_page_streams_a_story(browser):
    fake = FakeLanguageModel(delay=0.03)  # 40 tokens over ~1.2 s: the text visibly grows
    prompt = "Once upon a time, there was a girl named Lily."
    with BackgroundServer(create_app(fake, "fake-tiny", max_tokens_limit=256)) as server:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

        page.goto(server.url + "/")
        expect(page.locator("#model")).to_have_text("model: fake-tiny")
        assert page.locator("#max_tokens").get_attribute("max") == "256"  # the server's limit

        page.fill("#prompt", prompt)
        page.locator("#max_tokens").fill("40")
        page.fill("#seed", "5")
        assert page.locator("#max_tokens-value").text_content() == "40"
        page.click("#generate")

        # Mid-stream: some text, not all of it, and the button offers to stop.
        expect(page.locator("#story .text")).not_to_have_text("")
        partial = page.locator("#story .text").text_content()
        expected = "".join(expected_pieces(prompt, 5, 40))
        assert 0 < len(partial) < len(expected)
        assert page.locator("#generate").text_content() == "Stop"

        expect(page.locator("#generate")).to_have_text("Generate", timeout=20_000)
        assert page.locator("#story .prompt").text_content() == prompt
        assert page.locator("#story .text").text_content() == expected
        stats = page.locator("#stats").text_content()
        assert "40 tokens" in stats and "tokens/s" in stats and "stopped at max tokens" in stats

        # The page asked for what its controls show.
        started = fake.starts[-1]
        assert started["prompt"] == prompt and started["seed"] == 5
        assert started["config"] == SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=40, top_p=0.95,
                                                   repetition_penalty=1.0, seed=5)
        screenshot_dir = os.environ.get("TINYSTORIES_SCREENSHOT_DIR")
        if screenshot_dir:
            Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(screenshot_dir) / "serve_page.png"), full_page=True)

        # A server-side refusal is shown on the page, not thrown away.
        page.fill("#seed", "-1")
        page.click("#generate")
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("'seed' must be at least 0")

        # Stop ends a running story early, and clears the error.
        page.fill("#seed", "")
        page.locator("#max_tokens").fill("256")
        page.click("#generate")
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#story .text")).not_to_have_text("")
        page.click("#generate")
        expect(page.locator("#generate")).to_have_text("Generate")
        deadline = time.monotonic() + 5
        while not fake.starts[-1]["released"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.starts[-1]["released"] and fake.starts[-1]["produced"] < 256  # the slot was freed early
        page.close()

    assert errors == [] or all("400" in e for e in errors)  # only the deliberate refusal is logged
    assert requests and all(url.startswith(server.url + "/") for url in requests)  # nothing leaves the server
