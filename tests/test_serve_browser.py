"""The web page in a real browser: Debian's Chromium driven by Playwright, against a live server.

Needs `pip install playwright` (the dev extra) and `apt-get install -y chromium`; Playwright's own
browser download (`playwright install`) is not used. Without them the tests skip, except where
$TINYSTORIES_REQUIRE_BROWSER=1 (.ci/run sets it after installing chromium): there they fail.
Set TINYSTORIES_SCREENSHOT_DIR to keep the page's screenshot (serve-page.png: the shipped `tiny`
model's story, coloured by probability, one token inspected); README's docs/figures/serve-page.png
is made that way.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette", reason="the 'serve' extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
try:
    from playwright import sync_api
except ImportError:  # require_browser() says so, as a skip or (in CI) a failure
    sync_api = None

from serve_fakes import FakeLanguageModel, expected_pieces  # noqa: E402

from tinystories.config import SamplingConfig  # noqa: E402
from tinystories.serve import BackgroundServer, create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
REQUIRE_BROWSER = "TINYSTORIES_REQUIRE_BROWSER"
SCREENSHOT_NAME = "serve-page.png"


def require_browser(chromium: str = CHROMIUM) -> str:
    """The Chromium to launch. Without it (or without playwright) the test fails where
    $TINYSTORIES_REQUIRE_BROWSER=1 (CI) and skips elsewhere, saying how to install it."""
    if sync_api is None:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    elif not os.path.exists(chromium):
        missing = f"{chromium} is missing (Debian: apt-get install -y chromium)"
    else:
        return chromium
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{missing}; {REQUIRE_BROWSER}=1 requires it")
    pytest.skip(f"{missing}; CI sets {REQUIRE_BROWSER}=1 and fails instead of skipping")


def test_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    absent = str(tmp_path / "no-chromium")
    monkeypatch.setenv(REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match="requires it"):
        require_browser(absent)
    monkeypatch.delenv(REQUIRE_BROWSER)
    with pytest.raises(pytest.skip.Exception, match=f"CI sets {REQUIRE_BROWSER}=1"):
        require_browser(absent)


@pytest.fixture
def browser():
    chromium = require_browser()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_page_streams_a_story(browser):
    fake = FakeLanguageModel(delay=0.03)  # 40 tokens over ~1.2 s: the text visibly grows
    prompt = "Once upon a time, there was a girl named Lily."
    with BackgroundServer(create_app(fake, "fake-tiny", max_tokens_limit=256, model_process=False)) as server:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_have_text("model: fake-tiny")
        assert page.locator("#max_tokens").get_attribute("max") == "256"  # the server's limit

        page.fill("#prompt", prompt)
        page.locator("#max_tokens").fill("40")
        page.fill("#seed", "5")
        assert page.locator("#max_tokens-value").text_content() == "40"
        page.click("#generate")

        # Mid-stream: some text, not all of it, and the button offers to stop.
        sync_api.expect(page.locator("#story .text")).not_to_have_text("")
        partial = page.locator("#story .text").text_content()
        expected = "".join(expected_pieces(prompt, 5, 40))
        assert 0 < len(partial) < len(expected)
        assert page.locator("#generate").text_content() == "Stop"

        sync_api.expect(page.locator("#generate")).to_have_text("Generate", timeout=20_000)
        assert page.locator("#story .prompt").text_content() == prompt
        assert page.locator("#story .text").text_content() == expected
        stats = page.locator("#stats").text_content()
        assert "40 tokens" in stats and "tokens/s" in stats and "stopped at max tokens" in stats

        # The page asked for what its controls show.
        started = fake.starts[-1]
        assert started["prompt"] == prompt and started["seed"] == 5
        assert started["config"] == SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=40, top_p=0.95,
                                                   repetition_penalty=1.0, seed=5)
        # A server-side refusal is shown on the page, not thrown away.
        page.fill("#seed", "-1")
        page.click("#generate")
        sync_api.expect(page.locator("#error")).to_be_visible()
        sync_api.expect(page.locator("#error")).to_contain_text("'seed' must be at least 0")

        # Stop ends a running story early, and clears the error.
        page.fill("#seed", "")
        page.locator("#max_tokens").fill("256")
        page.click("#generate")
        sync_api.expect(page.locator("#error")).to_be_hidden()
        sync_api.expect(page.locator("#story .text")).not_to_have_text("")
        page.click("#generate")
        sync_api.expect(page.locator("#generate")).to_have_text("Generate")
        deadline = time.monotonic() + 5
        while not fake.starts[-1]["released"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.starts[-1]["released"] and fake.starts[-1]["produced"] < 256  # the slot was freed early
        page.close()

    assert errors == [] or all("400" in e for e in errors)  # only the deliberate refusal is logged
    assert requests and all(url.startswith(server.url + "/") for url in requests)  # nothing leaves the server


# ----------------------------------------------------------------------------------------------
# The model's choices: the shipped `tiny` model, each token inspected against the API's own logprobs

STORY_PROMPT = "Once upon a time, there was a little dog named Max."
STORY_SETTINGS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_tokens": 60, "seed": 7}  # the page's


def page_percent(probability: float) -> float:
    """What the page shows, read back: a percentage with one decimal."""
    return round(probability * 100, 1)


def shown_percent(text: str) -> float:
    match = re.fullmatch(r"([0-9.e+-]+)%", text.strip())
    assert match, text
    return float(match.group(1))


def interesting_position(logprobs: dict) -> int:
    """A generated word the model was unsure of: five distinct alternatives, and not its likeliest."""
    for k, (token, top) in enumerate(zip(logprobs["tokens"], logprobs["top_logprobs"])):
        if len(top) == 5 and token.strip().isalpha() and token != next(iter(top)):
            return k
    raise AssertionError(f"no uncertain word in {logprobs['tokens']}")


def background_alpha(locator) -> float:
    """The opacity of a token's highlight (0: none), from its computed 'rgba(r, g, b, a)' or 'rgb(r, g, b)'."""
    colour = locator.evaluate("span => getComputedStyle(span).backgroundColor")
    channels = re.findall(r"[0-9.]+", colour)
    return float(channels[3]) if len(channels) == 4 else 1.0


def assert_inspector_shows(page, token: str, logprob: float, top: dict[str, float]) -> None:
    assert page.locator("#chosen-token").get_attribute("data-token") == token
    shown = page.locator("#chosen-prob")
    assert float(shown.get_attribute("data-logprob")) == logprob
    assert abs(shown_percent(shown.text_content()) - page_percent(math.exp(logprob))) < 0.051
    rows = page.locator("#alternatives li")
    assert rows.count() == len(top) == 5
    for row, (text, value) in zip(rows.all(), top.items()):  # the API's order: likeliest first
        assert row.get_attribute("data-token") == text
        assert float(row.get_attribute("data-logprob")) == value
        assert abs(shown_percent(row.locator(".alt-prob").text_content()) - page_percent(math.exp(value))) < 0.051
        assert ("is-chosen" in (row.get_attribute("class") or "")) == (text == token)


def save_figure(png: bytes, path: Path) -> None:
    """The screenshot as a 256-colour PNG: a third of the size, so docs/figures stays small."""
    from PIL import Image  # matplotlib's own dependency

    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256).save(path, optimize=True)


@pytest.mark.slow
def test_page_shows_the_models_choices(browser, tmp_path):
    """The real `tiny`: the streamed story is the API's, each token's probability and top 5 are its
    logprobs for that position (the same request, not streamed), and colouring follows them."""
    from tinystories.generate import load_model

    with BackgroundServer(create_app(load_model("tiny"), "tiny", max_tokens_limit=256)) as server:
        reference = httpx.post(server.url + "/v1/completions", timeout=120,
                               json={"prompt": STORY_PROMPT, "logprobs": 5, **STORY_SETTINGS}).json()["choices"][0]
        context = browser.new_context(viewport={"width": 1000, "height": 780}, has_touch=True)
        page = context.new_page()
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_have_text("model: tiny")
        page.fill("#prompt", STORY_PROMPT)
        page.locator("#max_tokens").fill(str(STORY_SETTINGS["max_tokens"]))
        page.fill("#seed", str(STORY_SETTINGS["seed"]))
        page.click("#generate")
        sync_api.expect(page.locator("#generate")).to_have_text("Generate", timeout=60_000)
        assert page.locator("#story .text").text_content() == reference["text"]

        logprobs = reference["logprobs"]
        tokens = page.locator("#story .tok[data-index]")
        assert tokens.count() == len(logprobs["tokens"])  # every streamed token is inspectable
        k = interesting_position(logprobs)
        tokens.nth(k).hover()
        assert_inspector_shows(page, logprobs["tokens"][k], logprobs["token_logprobs"][k], logprobs["top_logprobs"][k])

        # A tap pins a token: it stays shown when the pointer leaves the story.
        j = next(i for i, token in enumerate(logprobs["tokens"]) if i != k and token.strip())
        tokens.nth(j).tap()
        page.mouse.move(2, 2)
        assert page.locator("#chosen-token").get_attribute("data-token") == logprobs["tokens"][j]
        assert "pinned" in tokens.nth(j).get_attribute("class")

        # Colouring: off, nothing is highlighted; on, the less likely a token the stronger its highlight.
        assert all(background_alpha(tokens.nth(i)) == 0 for i in (j, k))
        page.check("#colour")
        sync_api.expect(page.locator("#legend")).to_be_visible()
        for i in range(len(logprobs["tokens"])):
            expected_alpha = (1 - math.exp(logprobs["token_logprobs"][i])) * 0.8
            assert abs(background_alpha(tokens.nth(i)) - expected_alpha) < 0.01, i

        tokens.nth(k).hover()  # the screenshot shows the inspector open on the uncertain word
        folder = Path(os.environ.get("TINYSTORIES_SCREENSHOT_DIR") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        save_figure(page.screenshot(full_page=True), folder / SCREENSHOT_NAME)
        assert (folder / SCREENSHOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page.uncheck("#colour")
        assert background_alpha(tokens.nth(k)) == 0
        context.close()
