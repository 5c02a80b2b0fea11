"""The explorer in a real browser: Debian's chromium driven by Playwright, against `qkv serve`
in a process of its own, and the file `qkv explain --html` writes, opened from disk.
Screenshots of each tab go under the test's temporary directory (and QKV_SCREENSHOTS, if set)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import serving

from qkv.checkpoint import load_model

CHROMIUM = Path("/usr/bin/chromium")
TEXT = "the quick brown fox"

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(
            "CI needs Debian's chromium for the browser tests: apt-get install chromium"
        )
    pytest.skip("no /usr/bin/chromium here (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def url(model_dir: Path):
    with serving(model_dir) as (address, _):
        yield address


@pytest.fixture
def page(browser, tmp_path: Path):
    """A fresh page; every console error and uncaught exception is kept in page.errors."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.errors = []
    opened.on("console", lambda m: m.type == "error" and opened.errors.append(m.text))
    opened.on("pageerror", lambda e: opened.errors.append(str(e)))
    yield opened
    context.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("QKV_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["QKV_SCREENSHOTS"]) / path.name)


def explained(url: str, **body) -> dict:
    reply = httpx.post(f"{url}/v1/explain", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def shown_tokens(page) -> list[int]:
    return [int(t) for t in page.locator("#tokens .token small").all_inner_texts()]


def heatmap_values(page, stage: str) -> list[list[float]]:
    rows = page.locator(f'#weights-map table[data-stage="{stage}"] tbody tr, '
                        f'#scores-map table[data-stage="{stage}"] tbody tr')  # fmt: skip
    values = "cells => cells.map(c => c.dataset.value)"
    return [[float(v) for v in row.locator("td").evaluate_all(values)] for row in rows.all()]


def wait_explained(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#tokens .token').length === {count}")
    page.wait_for_function("document.getElementById('status').textContent.includes('explained')")


def test_the_explorer_shows_what_the_endpoint_returns(page, url: str, model_dir: Path, tmp_path):
    page.goto(f"{url}/")
    first = explained(url, text="The quick brown fox jumps over the lazy dog", layers=[0])
    wait_explained(page, len(first["tokens"]))
    assert shown_tokens(page) == first["token_ids"]

    page.fill("#text-input", TEXT)
    page.click("#explain-button")
    data = explained(url, text=TEXT, layers=[0], top=10)
    wait_explained(page, len(data["tokens"]))
    assert shown_tokens(page) == data["token_ids"]

    weights = next(s for s in data["stages"] if s["name"] == "attention_weights")
    assert heatmap_values(page, "attention_weights") == weights["values"][0]  # layer 0, head 0
    scores = next(s for s in data["stages"] if s["name"] == "scores")
    assert heatmap_values(page, "scores") == scores["values"][0]
    n = len(data["tokens"])  # causal: the later keys of each row are hatched, not coloured
    assert page.locator("#scores-map td.masked").count() == n * (n - 1) // 2
    first_row = page.locator("#scores-map tbody tr").first.locator("td")
    assert first_row.nth(1).get_attribute("class") == "masked"

    page.locator("#tokens .token").nth(2).click()
    selected = page.locator("#weights-map tr.selected")
    assert selected.count() == 1
    assert page.locator("#weights-map tbody tr").nth(2).get_attribute("class") == "selected"
    page.keyboard.press("ArrowRight")
    assert page.locator("#tokens .token").nth(3).get_attribute("aria-pressed") == "true"
    assert page.locator("#weights-map tbody tr").nth(3).get_attribute("class") == "selected"

    page.select_option("#head-select", "2")
    assert heatmap_values(page, "attention_weights") == weights["values"][2]
    page.select_option("#layer-select", "1")
    page.wait_for_function("document.querySelector('#weights-map table') && "
                           "document.getElementById('layer-select').value === '1'")  # fmt: skip
    assert page.locator("#lens-map tbody tr").count() == 2
    shoot(page, tmp_path, "explore")
    assert page.errors == []


def test_temperature_reshapes_the_distribution_and_sample_appends(page, url, model_dir, tmp_path):
    page.goto(f"{url}/")
    page.fill("#text-input", TEXT)
    page.click("#explain-button")
    data = explained(url, text=TEXT, layers=[0])
    wait_explained(page, len(data["tokens"]))
    model, _ = load_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([data["token_ids"]]))[0, -1]
    for temperature in ("2", "0.5"):
        page.fill("#temperature", temperature)
        page.click("#apply-sampling")
        note = f"temperature {temperature},"
        page.wait_for_function(
            f"document.getElementById('next-note').textContent.includes('{note}')"
        )
        texts = page.locator("#next-bars span.mono").all_inner_texts()
        probs = [float(t) for t in texts[1::2]]  # name, probability, name, ...
        expected = torch.softmax(logits / float(temperature), -1).topk(len(probs)).values
        for shown, p in zip(probs, expected.tolist(), strict=True):
            assert math.isclose(shown, p, abs_tol=6e-4)  # shown to 3 decimals
    page.click("#sample-button")
    wait_explained(page, len(data["tokens"]) + 1)
    assert shown_tokens(page)[:-1] == data["token_ids"]
    assert page.errors == []


def test_the_chat_tab_streams_the_servers_reply(page, url: str, tmp_path: Path) -> None:
    page.goto(f"{url}/")
    page.fill("#temperature", "0")
    page.click("#tab-chat")
    assert (
        page.locator("#view-chat").is_visible() and not page.locator("#view-explore").is_visible()
    )
    body = {"messages": [{"role": "user", "content": "the fox"}], "max_tokens": 128,
            "temperature": 0}  # fmt: skip
    expected = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    reply = expected["choices"][0]["message"]["content"]
    assert reply
    page.fill("#chat-input", "the fox")
    page.click("#chat-send")
    shown = "document.querySelector('#chat-log .assistant')"
    page.wait_for_function(f"{shown} && {shown}.textContent.length >= {len(reply)}")
    assert page.locator("#chat-log .assistant").inner_text() == reply
    shoot(page, tmp_path, "chat")
    assert page.errors == []


@pytest.mark.slow
def test_the_exported_file_opens_from_disk_with_the_same_numbers(page, url, model_dir, tmp_path):
    out = tmp_path / "walk.html"
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "--model", str(model_dir), TEXT, "--html",
         str(out)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page.goto(out.as_uri())
    data = explained(url, text=TEXT, top=10)
    page.wait_for_function(
        f"document.querySelectorAll('#tokens .token').length === {len(data['tokens'])}"
    )
    assert shown_tokens(page) == data["token_ids"]
    weights = next(s for s in data["stages"] if s["name"] == "attention_weights")
    assert heatmap_values(page, "attention_weights") == weights["values"][0]
    page.select_option("#layer-select", "1")
    later = next(s for s in data["stages"] if s["name"] == "attention_weights" and s["layer"] == 1)
    assert heatmap_values(page, "attention_weights") == later["values"][0]
    assert page.locator("#sample-button").is_disabled()
    shoot(page, tmp_path, "offline")

    one = tmp_path / "one-head.html"  # made for layer 1, head 2: the page starts there
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "--model", str(model_dir), TEXT, "--html",
         str(one), "--layer", "1", "--head", "2"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page.goto(one.as_uri())
    page.wait_for_selector("#weights-map table")
    options = "select => [...select.options].map(o => o.value)"
    assert page.locator("#layer-select").evaluate(options) == ["1"]
    assert page.locator("#head-select").evaluate(options) == ["2"]
    assert heatmap_values(page, "attention_weights") == later["values"][2]
    assert page.errors == []


def test_an_encoder_decoder_file_chooses_source_and_target_tokens_apart(page, pair_dir, tmp_path):
    """The encoder's panels follow a source token, the decoder's a target token: choosing the
    last source token leaves the target's choice (and the residual stream) as it was."""
    out = tmp_path / "pair.html"
    source = "4021398765"
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "--model", str(pair_dir), source, "--html",
         str(out)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page.goto(out.as_uri())
    page.wait_for_selector("#source-tokens .token")
    assert page.locator("#source-tokens .token").count() == len(source)
    assert not page.locator("#tab-chat").is_visible()
    page.select_option("#stack-select", "encoder")
    page.locator("#source-tokens .token").last.click()
    rows = page.locator("#weights-map tbody tr")
    assert rows.count() == len(source)
    assert rows.last.get_attribute("class") == "selected"
    assert page.locator("#tokens .token").first.get_attribute("aria-pressed") == "true"
    page.keyboard.press("ArrowLeft")
    assert rows.nth(len(source) - 2).get_attribute("class") == "selected"
    assert page.locator("#residual-table td").count() > 0
    page.select_option("#stack-select", "decoder")
    page.select_option("#kind-select", "cross_attention")
    cross = page.locator("#weights-map thead th")
    assert cross.count() == len(source) + 1  # a column per source token
    shoot(page, tmp_path, "encoder-decoder")
    assert page.errors == []
