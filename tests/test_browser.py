"""The web page in a real browser: `gptforge serve` on a tiny trained run, driven by Debian's
headless chromium through Playwright. Type a prompt, press Generate, wait for new text, check the
model card. GPTFORGE_UPDATE_SCREENSHOT=1 also saves docs/web.png (off by default so CI leaves the
tree clean)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
# Without the background-networking flags chromium keeps trying to reach the internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium); CI installs it"),
]

@pytest.fixture
def server(tiny_run, serve):
    """`gptforge serve` in a subprocess (conftest's `serve`); yields its URL and always stops it."""
    with serve(tiny_run, "--max-new-tokens-limit", "80") as port:
        yield f"http://127.0.0.1:{port}/"


def test_page_generates_text_and_shows_the_model_card(server, tiny_run):
    from playwright.sync_api import sync_playwright

    info = json.loads((tiny_run / "checkpoints" / "latest" / "info.json").read_text())
    evals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r for r in evals if r["kind"] == "eval" and r["step"] == info["step"]][-1]["val_loss"]
    prompt = "ROMEO:\n"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server, wait_until="domcontentloaded")
            box = page.locator("#prompt textarea")
            box.wait_for(timeout=60_000)
            box.fill(prompt)
            page.locator("#generate").click()
            # Output boxes are <textarea>s: wait on .value. The server limit is 80 tokens (the slider's
            # default and maximum), one character each for this char-level model.
            page.wait_for_function(
                "n => { const t = document.querySelector('#output textarea'); return t && t.value.length >= n; }",
                arg=len(prompt) + 80, timeout=60_000,
            )
            text = page.locator("#output textarea").input_value()
            assert text.startswith(prompt) and len(text) == len(prompt) + 80
            card = page.locator("#model-card").inner_text()
            assert f"{info['step']:,}" in card and f"{val_loss:.4f}" in card and "char" in card
            assert page.locator("#loss-plot img").count() == 1  # the run's loss.png
            if os.environ.get("GPTFORGE_UPDATE_SCREENSHOT") == "1":
                page.screenshot(path=str(REPO / "docs" / "web.png"), full_page=True)
        finally:
            browser.close()
