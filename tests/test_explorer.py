"""The explorer's data: POST /v1/explain is `qkv explain --json`, its numbers the model's own;
the next-token panel is the server's sampling; the page and the offline file are whole."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from qkv.checkpoint import load_model
from qkv.explain import NOTES_SENTENCE, explain_text, payload
from qkv.server import create_app, load_served, notes_served

TEXT = "the quick brown fox"


@pytest.fixture(scope="module")
def app(model_dir: Path):
    with TestClient(create_app(load_served(model_dir, "cpu"))) as client:
        yield client


def explain(app: TestClient, **body) -> dict:
    reply = app.post("/v1/explain", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_endpoint_returns_what_qkv_explain_json_prints(app, model_dir: Path) -> None:
    served = explain(app, text=TEXT, layers=[1], heads=[2], top=5)
    printed = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "--model", str(model_dir), TEXT, "--json",
         "--layer", "1", "--head", "2", "--top", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == served
    assert {s["layer"] for s in served["stages"] if "layer" in s} == {0, 1}  # lens covers all
    assert {s["layer"] for s in served["stages"] if s.get("layer") is not None
            and s["name"] != "logit_lens"} == {1}  # fmt: skip
    n = len(TEXT)  # a character tokenizer
    assert served["tokens"] == list(TEXT)
    weights = next(s for s in served["stages"] if s["name"] == "attention_weights")
    assert weights["head_ids"] == [2] and weights["shape"] == [1, n, n]
    keys = next(s for s in served["stages"] if s["name"] == "key")
    assert keys["head_ids"] == [2] and keys["heads_total"] == 4 and keys["shape"] == [n, 8]


def test_its_numbers_are_the_models_own_logits_and_weights(app, model_dir: Path) -> None:
    data = explain(app, text=TEXT, top=8)
    model, tokenizer = load_model(model_dir)
    ids = torch.tensor([data["token_ids"]])
    assert data["token_ids"] == tokenizer.encode_inputs([TEXT])[0]
    with torch.no_grad():
        logits = model(ids)[0]
    stage = next(s for s in data["stages"] if s["name"] == "logits")
    best = torch.topk(logits, 8)
    assert stage["top"]["ids"] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(stage["top"]["values"]), best.values, atol=1e-5, rtol=0)
    lens = [s for s in data["stages"] if s["name"] == "logit_lens"]
    probs = next(s for s in data["stages"] if s["name"] == "probabilities")
    assert lens[-1]["top"] == probs["top"]
    torch.testing.assert_close(
        torch.tensor(probs["top"]["values"]), torch.softmax(logits, -1).topk(8).values,
        atol=1e-5, rtol=0,
    )  # fmt: skip
    rows = data["residual_stream"]["rows"]
    assert [r["label"] for r in rows] == [
        "embeddings", "layer 0 attention", "layer 0 feed_forward", "layer 1 attention",
        "layer 1 feed_forward",
    ]  # fmt: skip
    for row in rows:
        assert len(row["norm"]) == len(data["tokens"]) and min(row["std"]) >= 0


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (2.0, 0, 1.0), (0.5, 3, 1.0),
                                                        (1.0, 0, 0.5), (0.0, 0, 1.0)])  # fmt: skip
def test_the_next_token_panel_follows_the_sampling_formula(
    app,
    model_dir: Path,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    data = explain(app, text=TEXT, top=100, temperature=temperature, top_k=top_k, top_p=top_p)
    model, _ = load_model(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([data["token_ids"]]))[0, -1]
    next_token = data["next_token"]
    shown = dict(zip(next_token["ids"], next_token["probs"], strict=True))
    if temperature == 0:
        assert shown == {int(logits.argmax()): 1.0} and next_token["candidates"] == 1
        return
    expected = torch.softmax(logits / temperature, -1)  # p_v = exp(l_v / T) / sum exp(l_w / T)
    order = expected.argsort(descending=True)
    keep = torch.ones_like(expected, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    mass = expected[order].cumsum(0) - expected[order]
    keep[order[mass >= top_p]] = False
    expected = torch.where(keep, expected, 0.0)
    expected = expected / expected.sum()
    assert next_token["candidates"] == int(keep.sum())
    for token, p in shown.items():
        assert math.isclose(p, float(expected[token]), abs_tol=1e-5)


def test_sample_draws_the_token_completions_draws_with_the_same_seed(app) -> None:
    for seed in (1, 2, 3):
        data = explain(app, text=TEXT, sample=True, seed=seed, temperature=1.5)
        completion = app.post(
            "/v1/completions",
            json={"prompt": TEXT, "max_tokens": 1, "seed": seed, "temperature": 1.5},
        ).json()
        assert data["next_token"]["sampled"]["text"] == completion["choices"][0]["text"]
    again = explain(app, token_ids=[*data["token_ids"], data["next_token"]["sampled"]["id"]])
    assert again["tokens"][-1] == data["next_token"]["sampled"]["text"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "`text`, or its `token_ids`"),
        ({"text": "a", "token_ids": [1]}, 400, "one of"),
        ({"text": ""}, 400, "empty"),
        ({"text": TEXT, "layers": [2]}, 400, "layer 2 does not exist: the model has 2 layers"),
        ({"text": TEXT, "heads": [-1]}, 400, "head -1 does not exist"),
        ({"text": TEXT, "layers": []}, 400, "layers: List should have at least 1 item"),
        ({"text": TEXT, "heads": []}, 400, "heads: List should have at least 1 item"),
        ({"text": TEXT, "top": 0}, 400, "top"),
        ({"text": TEXT, "temperature": -1}, 400, "temperature"),
        ({"text": TEXT, "top_p": 0}, 400, "top_p"),
        ({"token_ids": [10**6]}, 400, "token ids must be 0 to"),
        ({"text": "fox " * 80}, 400, "explain shows at most 64"),
        ({"text": TEXT, "model": "other"}, 404, "does not exist"),
        ({"text": 3}, 400, "text"),
    ],
)
def test_bad_explain_requests_are_refused_and_the_server_goes_on(app, body, status, message):
    reply = app.post("/v1/explain", json=body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"]
    assert explain(app, text="the fox")["tokens"]


def test_the_notes_example_explains_any_words_and_serves_nothing_else() -> None:
    with TestClient(create_app(notes_served())) as client:
        data = explain(client, text=NOTES_SENTENCE, top=3, sample=True, seed=5)
        assert data == payload(explain_text(NOTES_SENTENCE), top=3, seed=5)
        assert data["untrained"] and data["config"]["d_model"] == 4
        assert data["next_token"]["sampled"]["text"] in NOTES_SENTENCE.lower().split()
        for path, body in [("/v1/completions", {"prompt": "x"}), ("/tokenize", {"prompt": "x"}),
                           ("/v1/explain", {"token_ids": [1]})]:  # fmt: skip
            reply = client.post(path, json=body)
            assert reply.status_code == 400 and "error" in reply.json(), path
        page = client.get("/")
        assert page.status_code == 200 and '"notes": true' in page.text
        assert '"chat": false' in page.text and '"sample": true' in page.text


def test_an_encoder_is_explained_without_a_next_token(minilm: Path) -> None:
    with TestClient(create_app(load_served(minilm, "cpu"))) as client:
        data = explain(client, text="the fox", layers=[0], heads=[0])
    assert "next_token" not in data
    assert not any(s["name"] == "logit_lens" for s in data["stages"])
    assert data["tokens"][0] == "[CLS]" and data["config"]["arch"] == "encoder"


@pytest.mark.slow
def test_the_page_is_one_whole_file(app, tmp_path: Path) -> None:
    page = app.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "{{" not in page.text and "function render()" in page.text
    assert not re.search(r'(src|href)="(?!data:)', page.text)  # nothing fetched
    out = tmp_path / "walk.html"
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "The quick fox", "--html", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    embedded = re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>',
                         out.read_text(), re.S)  # fmt: skip
    data = json.loads(embedded.group(1))
    assert data["tokens"] == ["The", "quick", "fox"] and data["text"] == "The quick fox"
    nowhere = str(tmp_path / "no" / "x.html")
    bad = subprocess.run([sys.executable, "-m", "qkv", "explain", "--html", nowhere],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "does not exist; create it first" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hugging_face_directories_are_explained(family: str, tmp_path: Path) -> None:
    from test_explain_models import HF_MODELS, TEXT, word_tokenizer

    torch.manual_seed(0)
    HF_MODELS[family]().save_pretrained(tmp_path)
    word_tokenizer(tmp_path)
    with TestClient(create_app(load_served(tmp_path, "cpu"))) as client:
        data = explain(client, text=TEXT, layers=[1], top=3)
        page = client.get("/")
    assert data["tokens"] == TEXT.split() and page.status_code == 200
    lens = [s["layer"] for s in data["stages"] if s["name"] == "logit_lens"]
    assert lens == ([] if family == "bert" else [0, 1])
    assert ("next_token" in data) == (family != "bert")
    weights = [s for s in data["stages"] if s["name"] == "attention_weights"]
    assert [s["layer"] for s in weights] == [1] and weights[0]["shape"] == [4, 6, 6]


def test_qkv_explore_serves_the_notes_example_and_opens_the_browser(tmp_path: Path) -> None:
    """`qkv explore` with no model: the page and /v1/explain answer, and the browser ($BROWSER,
    as Python's webbrowser reads it) is handed the address once the server listens."""
    import os
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "explore", "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "BROWSER": str(browser)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        assert opened.read_text().strip() == url
        assert "notes" in httpx.get(url).text
        data = httpx.post(f"{url}v1/explain", json={"text": "The quick fox"}).json()
        assert data["tokens"] == ["The", "quick", "fox"] and data["untrained"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"exploring the notes' example at http://127.0.0.1:{port}/" in stderr
    assert "Traceback" not in stderr


def test_an_encoder_decoder_shows_cross_attention_over_the_source(pair_dir: Path) -> None:
    """The decoder reads E + the target it writes greedily; cross-attention has a row per target
    token and a column per source token; logits are the model's own on (source, target)."""
    from qkv.generate import greedy_decode

    model, tokenizer = load_model(pair_dir)
    source = "40213"
    with TestClient(create_app(load_served(pair_dir, "cpu"))) as client:
        data = explain(client, text=source, top=5)
        refused = client.post("/v1/completions", json={"prompt": source})
        page = client.get("/")
    assert refused.status_code == 400 and "encoder-decoder" in refused.json()["error"]["message"]
    assert '"chat": false' in page.text and '"sample": false' in page.text
    src = torch.tensor([tokenizer.encode(source)])
    end = tokenizer.end_of_text_id
    target = [end, *greedy_decode(model, src, torch.ones_like(src), end, 32)[0]]
    assert data["source"] == list(source) and data["token_ids"] == target
    cross = [s for s in data["stages"] if s["name"] == "attention_weights"
             and s.get("sublayer") == "cross_attention"]  # fmt: skip
    assert [s["layer"] for s in cross] == [0, 1]
    assert cross[0]["shape"] == [4, len(target), len(source)] and cross[0]["columns"] == list(
        source
    )
    encoder = [s for s in data["stages"] if s.get("stack") == "encoder" and s["name"] == "scores"]
    assert encoder[0]["rows"] == list(source) and encoder[0]["shape"] == [4, 5, 5]
    with torch.no_grad():
        logits = model(src, torch.tensor([target]))[0]
    shown = next(s for s in data["stages"] if s["name"] == "logits")
    best = logits.topk(5)
    assert shown["top"]["ids"] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(shown["top"]["values"]), best.values, atol=1e-5, rtol=0)
    lens = [s for s in data["stages"] if s["name"] == "logit_lens"]
    assert [s["layer"] for s in lens] == [0, 1] and lens[-1]["top"] == next(
        s for s in data["stages"] if s["name"] == "probabilities"
    )["top"]


def test_a_lora_adapter_is_explained_with_its_adapted_weights(tmp_path: Path) -> None:
    from test_cli_finetune import checkpoint, finetune

    base = checkpoint(tmp_path / "base", "decoder")
    adapter = Path(finetune(tmp_path, base, tmp_path / "lora", "--steps", "3", "--lora-rank", "4"))
    with TestClient(create_app(load_served(adapter, "cpu"))) as client:
        data = explain(client, text="the fox", top=5)
    adapted, tokenizer = load_model(adapter)
    plain, _ = load_model(base)
    ids = torch.tensor([tokenizer.encode_inputs(["the fox"])[0]])
    with torch.no_grad():
        ours, theirs = adapted(ids)[0], plain(ids)[0]
    shown = torch.tensor(next(s for s in data["stages"] if s["name"] == "logits")["top"]["values"])
    torch.testing.assert_close(shown, ours.topk(5).values, atol=1e-5, rtol=0)
    assert (ours[:, : theirs.shape[-1]] - theirs).abs().max() > 1e-4  # the adapter changed them


def test_a_model_that_overflows_is_refused_naming_the_stage(model_dir: Path, tmp_path) -> None:
    """A checkpoint whose embedding of 'x' is inf: explain names the first stage that holds it
    (JSON has no inf); the server answers 400, for any text (the tied head scores 'x' inf
    everywhere), and goes on serving."""
    from qkv.checkpoint import write_checkpoint

    model, tokenizer = load_model(model_dir)
    with torch.no_grad():
        model.embedder.token_embedding.weight[tokenizer.encode("x")[0]] = math.inf
    broken = write_checkpoint(tmp_path / "broken", model, tokenizer)
    printed = subprocess.run(
        [sys.executable, "-m", "qkv", "explain", "--model", str(broken), "a x b", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode != 0 and printed.stdout == ""
    assert "stage embeddings holds inf or NaN" in printed.stderr
    assert "Traceback" not in printed.stderr
    with TestClient(create_app(load_served(broken, "cpu"))) as client:
        for text, stage in [("a x b", "embeddings"), ("a b", "logit_lens (layer 0)")]:
            reply = client.post("/v1/explain", json={"text": text})
            assert reply.status_code == 400
            assert f"stage {stage} holds inf or NaN" in reply.json()["error"]["message"]
        assert client.get("/health").json() == {"status": "ok"}


def test_the_page_keeps_any_text_inside_its_data(tmp_path: Path) -> None:
    """A text with '</script>', '<!--' and the page's own markers comes back whole from the
    exported file, and the page's scripts are the only ones in it."""
    text = "a </script> <!-- b {{JS}} c"
    out = tmp_path / "walk.html"
    result = subprocess.run([sys.executable, "-m", "qkv", "explain", text, "--html", str(out)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    assert html.count("<script") == 3 and html.count("</script>") == 3
    embedded = re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', html,
                         re.S)  # fmt: skip
    assert json.loads(embedded.group(1))["text"] == text


def test_explain_requests_beyond_the_limit_wait_no_longer_than_a_503() -> None:
    """At most MAX_EXPLAINS explain requests wait for the model; the next is told to retry,
    and running out of memory is a 503 too, after which the server explains again."""
    import asyncio
    import threading

    from qkv.server import MAX_EXPLAINS, ApiError

    served = notes_served()
    release = threading.Event()

    async def crowd() -> None:
        waiting = [asyncio.create_task(served.exclusive(release.wait)) for _ in range(MAX_EXPLAINS)]
        await asyncio.sleep(0.1)
        with pytest.raises(ApiError) as busy:
            await served.exclusive(lambda: None)
        assert busy.value.status == 503 and "busy" in busy.value.message
        release.set()
        assert await asyncio.gather(*waiting) == [True] * MAX_EXPLAINS

        def out_of_memory() -> None:
            raise MemoryError

        with pytest.raises(ApiError) as full:
            await served.exclusive(out_of_memory)
        assert full.value.status == 503 and "not enough memory" in full.value.message
        assert await served.exclusive(lambda: 7) == 7

    asyncio.run(crowd())
