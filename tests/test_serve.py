"""`qkv serve`: OpenAI's API over the continuous batcher, checked with the real `openai` client
against a server process, and in this process for the error cases. What a request generates is
what the Generator generates for it alone, whatever runs beside it."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from conftest import CHAT_TEXT as TEXT
from fastapi.testclient import TestClient
from test_embed import SENTENCES, reference  # noqa: F401 (a fixture)

from qkv.chat_template import answer_prompt
from qkv.checkpoint import write_checkpoint
from qkv.config import ModelConfig
from qkv.generate import Generator
from qkv.model import DecoderLM
from qkv.server import create_app, load_served
from qkv.tokenizer import Tokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def alone(model_dir) -> Generator:
    return Generator.load(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, *options: str) -> Iterator[tuple[str, int]]:
    """`qkv serve --model MODEL_DIR OPTIONS` in a process of its own on a free port: (its URL,
    its pid) once /health answers; stopped by SIGTERM after, with no traceback."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "serve", "--model", str(model_dir), "--port", str(port),
         "--device", "cpu", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def server(model_dir):
    """The server the client tests share: an API key, four rows."""
    with serving(model_dir, "--api-key", KEY, "--max-batch", "4") as (url, _):
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_completions_are_what_the_generator_gives_alone(client, alone):
    result = client.completions.create(
        model="tiny", prompt="the quick", max_tokens=12, temperature=0.8, seed=5
    )
    expected = alone.generate("the quick", max_new_tokens=12, temperature=0.8, seed=5, top_k=0)
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 9 and result.usage.completion_tokens == 12


def test_concurrent_requests_each_generate_what_they_do_alone(client, alone):
    """Eight clients at once through four rows: joins, waits and leaves, each row its own."""

    def ask(seed: int) -> str:
        prompt = TEXT[: 3 + 4 * seed]
        return (
            client.completions.create(
                model="tiny", prompt=prompt, max_tokens=6 + seed, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(8)))
    for seed, text in enumerate(texts):
        prompt = TEXT[: 3 + 4 * seed]
        expected = alone.generate(prompt, max_new_tokens=6 + seed, temperature=1.0, seed=seed,
                                  top_k=0)  # fmt: skip
        assert text == expected.text, seed


def test_streamed_chat_is_the_template_continued(client, alone):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fox?"}]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    turns = [("system", "be brief"), ("user", "fox?")]
    expected = alone.generate(
        answer_prompt(turns, alone.tokenizer), max_new_tokens=10, temperature=0,
        stop=("<|system|>", "<|user|>", "<|assistant|>"),
    )  # fmt: skip
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_wrong_key_is_401_and_health_stays_open(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="a")
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices


@pytest.fixture(scope="module")
def local(model_dir):
    served = load_served(model_dir, "cpu", "tiny", max_batch=2, max_queue=2)
    with TestClient(create_app(served)) as test_client:
        yield test_client
    served.engine.stop()


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b'{"prompt": "\xff\xfe"}', 400, None),
        (b"[1, 2]", 400, None),
        (b'{"max_tokens": 3}', 400, "prompt"),
        (b'{"prompt": 7}', 400, "prompt"),
        (b'{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
        (b'{"prompt": "a", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
        (b'{"prompt": "a", "n": 0}', 400, "n"),
        (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"prompt": "a", "stop": [""]}', 400, "stop"),
        (b'{"prompt": "' + b"fox " * 40 + b'"}', 400, "prompt"),
        (b'{"prompt": "a", "model": "gpt-4"}', 404, "model"),
    ],
)
def test_each_bad_request_is_one_error_object(local, body, status, param):
    response = local.post("/v1/completions", content=body,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert local.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_a_body_over_the_limit_is_413(local):
    response = local.post("/v1/completions", content=b"x" * (9 << 20),
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 413 and "over 8 MiB" in response.json()["error"]["message"]


def test_chat_on_a_model_without_chat_tokens_is_400(tmp_path):
    tokenizer = Tokenizer.train_char([TEXT])
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2,
                                  n_layers=1, max_seq_len=32))  # fmt: skip
    served = load_served(write_checkpoint(tmp_path / "plain", model, tokenizer), "cpu")
    with TestClient(create_app(served)) as test_client:
        response = test_client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
    served.engine.stop()
    assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]


def test_a_full_queue_is_503_with_retry_after(local):
    """Two rows and a queue of two: of twelve requests at once some are turned away, and each
    of those says when to retry; the rest complete."""
    body = {"prompt": "the", "max_tokens": 40, "temperature": 1.0}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: local.post("/v1/completions", json=body), range(12)))
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes and set(codes) == {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1" and "busy" in refused.json()["error"]["message"]


def test_streamed_completion_ends_with_done(local):
    with local.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 4,
                      "stream": True, "seed": 1}) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all labels) at GET /metrics."""
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))  # fmt: skip


def long_context(folder: Path) -> Path:
    """A one-layer decoder with a 100,000-token context: a stream that outlasts any test."""
    tokenizer = Tokenizer.train_char([TEXT])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=1,
                         max_seq_len=100_000, position="rope")  # fmt: skip
    return write_checkpoint(folder, DecoderLM(config), tokenizer)


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_is_dropped_and_the_rest_goes_on(tmp_path):
    """The stream could run for 90,000 tokens: the row leaves when its client does (a short one
    may finish before the server notices the closed connection)."""
    with serving(long_context(tmp_path / "long")) as (url, _):
        body = {"prompt": "the", "max_tokens": 90_000, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
            next(line for line in stream.iter_lines() if line)
        deadline = time.monotonic() + 20
        while metric(url, "qkv_cancelled_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "qkv_cancelled_total") == 1
        short = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 3})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3


def test_metrics_count_requests_tokens_and_latencies(server, client):
    requests = metric(server, 'qkv_requests_total{path="/v1/completions",status="200"}')
    tokens = metric(server, "qkv_completion_tokens_total")
    client.completions.create(model="tiny", prompt="the lazy", max_tokens=5, temperature=0)
    assert metric(server, 'qkv_requests_total{path="/v1/completions",status="200"}') == (
        requests + 1
    )
    assert metric(server, "qkv_completion_tokens_total") == tokens + 5
    assert metric(server, "qkv_time_to_first_token_seconds_count") >= 1
    assert metric(server, "qkv_inter_token_latency_seconds_count") >= 1
    assert metric(server, "qkv_running_batch") >= 0
    assert "qkv_running_batch" in httpx.get(f"{server}/metrics", headers=AUTH).text


@pytest.fixture(scope="module")
def embedding(minilm):
    """all-MiniLM-L6-v2 served in this process, and the real openai client talking to it."""
    served = load_served(minilm, "cpu", "minilm")
    with TestClient(create_app(served)) as test_client:
        yield (
            test_client,
            openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=test_client),
        )


def test_embeddings_are_sentence_transformers(embedding, reference):  # noqa: F811
    """The openai client asks for base64 and decodes it; plain floats give the same."""
    test_client, client = embedding
    result = client.embeddings.create(model="minilm", input=SENTENCES)
    got = torch.tensor([item.embedding for item in result.data])
    assert torch.allclose(got, reference, atol=1e-5)
    assert [item.index for item in result.data] == [0, 1, 2, 3] and result.usage.prompt_tokens > 4
    plain = test_client.post("/v1/embeddings", json={"input": SENTENCES[1],
                             "encoding_format": "float"}).json()  # fmt: skip
    assert torch.allclose(torch.tensor(plain["data"][0]["embedding"]), reference[1], atol=1e-5)


def test_embeddings_of_token_ids_are_those_of_their_text(embedding, reference):  # noqa: F811
    test_client, _ = embedding
    ids = test_client.post("/tokenize", json={"prompt": SENTENCES[0]}).json()["tokens"]
    for given in (ids, [ids]):
        body = test_client.post("/v1/embeddings", json={"input": given}).json()
        assert torch.allclose(torch.tensor(body["data"][0]["embedding"]), reference[0], atol=1e-5)
    packed = test_client.post("/v1/embeddings", json={"input": "qkv", "encoding_format":
                              "base64"}).json()["data"][0]["embedding"]  # fmt: skip
    vector = torch.frombuffer(bytearray(base64.b64decode(packed)), dtype=torch.float32)
    assert torch.allclose(vector, reference[3], atol=1e-5)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", " "]}, "input"),
        ({"input": [[101, 102], []]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": [101] * 513}, "input"),
        ({"input": "ok", "dimensions": 128}, "dimensions"),
        ({"input": 3.5}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(embedding, body, param):
    test_client, _ = embedding
    response = test_client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_encoder_does_not_complete_and_a_decoder_does_not_embed(embedding, local):
    test_client, _ = embedding
    response = test_client.post("/v1/completions", json={"prompt": "a"})
    assert response.status_code == 400 and "encoder" in response.json()["error"]["message"]
    response = local.post("/v1/embeddings", json={"input": "a"})
    assert response.status_code == 400 and "decoder" in response.json()["error"]["message"]


def test_tokenize_and_detokenize_round_trip(local, alone):
    tokens = local.post("/tokenize", json={"prompt": "the fox"}).json()
    assert tokens["tokens"] == alone.tokenizer.encode("the fox") and tokens["count"] == 7
    chat = local.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == answer_prompt([("user", "hi")], alone.tokenizer)
    text = local.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "the fox"}
    assert local.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


@pytest.mark.slow
def test_sigterm_ends_running_streams_with_a_finish_reason(tmp_path):
    """A long stream is running when SIGTERM comes: with no grace it ends at the next step with
    finish_reason "length" and [DONE], and the process exits within seconds."""
    with serving(long_context(tmp_path / "long"), "--shutdown-grace", "0") as (url, pid):
        body = {"prompt": "the", "max_tokens": 90_000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line)
            started = time.monotonic()
            psutil.Process(pid).send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert psutil.Process(pid).wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises
        assert time.monotonic() - started < 10
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_soak_sixteen_clients_two_hundred_requests_a_quarter_leaving(model_dir):
    """16 clients send 200 requests, every fourth a stream the client leaves after its first
    chunk: every other request succeeds, none hangs, the batch empties, and the process's
    memory ends within 10% of where it was after warm-up."""
    with serving(model_dir, "--max-batch", "8", "--max-queue", "256") as (url, pid):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        def request(i: int) -> str:
            body = {"prompt": TEXT[: 5 + i % 30], "max_tokens": 8 + i % 17, "seed": i}
            if i % 4 == 0:
                with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True},
                                  timeout=60) as stream:  # fmt: skip
                    next(stream.iter_lines())
                return "left"
            return client.completions.create(model="tiny", **body).choices[0].finish_reason

        for i in range(16):  # warm-up
            request(i + 1 if i % 4 == 0 else i)
        memory = psutil.Process(pid).memory_info().rss
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(request, range(200)))
        assert outcomes.count("left") == 50
        assert all(o in ("stop", "length") for o in outcomes if o != "left")
        deadline = time.monotonic() + 30
        while metric(url, "qkv_running_batch") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0 < metric(url, "qkv_cancelled_total") <= 50  # a short stream may end first
        after = psutil.Process(pid).memory_info().rss
        assert after <= 1.1 * memory, (memory, after)


def test_logprobs_are_the_models_own_at_each_chosen_token(local, alone):
    """Greedy, with 3 alternatives: each token's log p equals log_softmax of the model's logits
    at its position (a full forward pass over prompt + completion), the likeliest listed first."""
    body = {"prompt": "the quick", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    choice = local.post("/v1/completions", json=body).json()["choices"][0]
    prompt = alone.tokenizer.encode("the quick")
    tokens = alone.generate("the quick", max_new_tokens=6, temperature=0).token_ids
    with torch.no_grad():
        logits = alone.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1)
    got = choice["logprobs"]
    assert got["tokens"] == [alone.tokenizer.decode([t]) for t in tokens]
    for i, token in enumerate(tokens):
        assert abs(got["token_logprobs"][i] - float(expected[i, token])) < 1e-4
        top = got["top_logprobs"][i]
        assert 1 <= len(top) <= 3  # byte tokens that decode alike share a key, as in OpenAI's
        assert max(top.values()) == pytest.approx(got["token_logprobs"][i])


def test_chat_logprobs_through_the_openai_client(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "fox?"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
