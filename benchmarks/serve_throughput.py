"""Serving throughput: `qkv serve` vs `transformers serve --continuous-batching` on the same
random GPT-2-small weights (a Hugging Face directory), one server after the other, loaded by
the same client code: streaming completions of 128 new tokens at 1, 4, 8 and 16 concurrent
clients.

  pip install "transformers[serving]"          the reference server
  python benchmarks/serve_throughput.py        GPT-2 small shape (124M), 2 requests per client
  python benchmarks/serve_throughput.py --quick   2 layers, 64 tokens: a fast look

Each client sends its requests one after another; tokens/s is every completion token (each
server's own `usage` count) over the wall time of that concurrency level. With --rounds N the
servers take turns N times (qkv, transformers, qkv, ...) and each level reports its best round:
a shared machine's noise only ever slows a run down. Time to first token
(TTFT) runs from sending a request to its first streamed text; inter-token latency (ITL) is the
gap between streamed chunks. The bandwidth bound is what one stream can reach at best: every
weight is read once per step, so tokens/s <= copy bandwidth / weight bytes (measured here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from generate_throughput import copy_bandwidth

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 50257  # GPT-2's


def corpus() -> str:
    """Text for the tokenizer and the prompts: tinyshakespeare when present, else the
    standard library's docstrings."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from qkv.data import stdlib_docs

    return "\n".join(stdlib_docs())


def gpt2_directory(folder: Path, text: str, layers: int) -> Path:
    """Random GPT-2-small weights (seed 0) and a byte-level BPE tokenizer trained on `text`,
    padded with plain tokens to GPT-2's 50,257 so every id the model can pick decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(
        (text[i : i + 10_000] for i in range(0, len(text), 10_000)), trainer
    )
    backend.add_tokens([f" t{i}" for i in range(VOCAB - backend.get_vocab_size())])
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.do_sample = True
    model.save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    model: str  # the name requests give
    process: subprocess.Popen | None = None
    url: str = ""

    def start(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the server runs)
        self.process = subprocess.Popen(
            [*self.command, "--port", str(port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.log.seek(0)
        raise SystemExit(f"{self.name} did not start:\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Level:
    """What one concurrency level measured."""

    tokens: int = 0
    seconds: float = 0.0
    first: list[float] = field(default_factory=list)  # TTFT per request
    gaps: list[float] = field(default_factory=list)  # ITL per chunk
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_one(server: Server, prompt: str, tokens: int, seed: int, level: Level) -> None:
    """One streaming completion; its TTFT, chunk gaps and usage go into `level`."""
    body = {
        "model": server.model, "prompt": prompt, "max_tokens": tokens, "temperature": 1.0,
        "top_p": 1.0, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    times, used = [], 0
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    with level.lock:
        level.tokens += used
        if times:
            level.first.append(times[0] - sent)
            level.gaps += [b - a for a, b in itertools.pairwise(times)]


def load(server: Server, prompts: list[str], clients: int, requests: int, tokens: int) -> Level:
    """`clients` threads, each sending `requests` streaming completions one after another."""
    level = Level()

    def client(number: int) -> None:
        for turn in range(requests):
            index = number * requests + turn
            stream_one(server, prompts[index % len(prompts)], tokens, index, level)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - start
    return level


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 64 new tokens")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels (1,4,8,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (2)")
    parser.add_argument("--tokens", type=int, help="new tokens per request (128)")
    parser.add_argument("--only", choices=["qkv", "transformers"], help="run one server")
    parser.add_argument("--rounds", type=int, default=1, help="turns each server takes (1)")
    args = parser.parse_args()
    tokens = args.tokens or (64 if args.quick else 128)
    levels = [int(c) for c in args.clients.split(",")]
    text = corpus()
    words = text.split()
    prompts = [" ".join(words[i * 40 : i * 40 + 24]) for i in range(64)]  # ~32 tokens each

    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        model_dir = gpt2_directory(folder / "gpt2", text, 2 if args.quick else 12)
        weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        bandwidth = copy_bandwidth()
        bound = bandwidth / weights
        print(f"GPT-2 shape, {'2' if args.quick else '12'} layers, {weights / 1e6:.0f} MB of "
              f"weights; {os.cpu_count()} CPUs, torch {torch.__version__}; copy bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s -> one stream <= {bound:.0f} tokens/s")  # fmt: skip
        servers = [
            Server("qkv serve", [sys.executable, "-m", "qkv", "serve", "--model", str(model_dir),
                   "--device", "cpu", "--max-batch", str(max(levels)), "--max-queue", "256"],
                   "gpt2"),
            Server("transformers serve", [shutil.which("transformers") or "transformers",
                   "serve", str(model_dir), "--continuous-batching", "--device", "cpu"],
                   str(model_dir)),
        ]  # fmt: skip
        if args.only:
            servers = [s for s in servers if s.name.startswith(args.only)]
        results: dict[tuple[str, int], Level] = {}
        for turn in range(args.rounds):
            for server in servers:
                server.start(free_port())
                try:
                    load(server, prompts, 2, 1, 8)  # warm-up
                    for clients in levels:
                        level = load(server, prompts, clients, args.requests, tokens)
                        rate = level.tokens / level.seconds
                        best = results.get((server.name, clients))
                        if best is None or rate > best.tokens / best.seconds:
                            results[server.name, clients] = level
                        print(f"  round {turn + 1}, {server.name}, {clients} clients: "
                              f"{rate:.1f} tokens/s", flush=True)  # fmt: skip
                finally:
                    server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(results, servers, levels, tokens)


def report(results: dict[tuple[str, int], Level], servers: list[Server], levels: list[int],
           tokens: int) -> None:  # fmt: skip
    print(f"\nstreaming completions, {tokens} new tokens, ~32-token prompts")
    header = (f"{'server':<20}{'clients':>8}{'tokens/s':>10}{'vs 1 client':>12}"
              f"{'TTFT p50':>10}{'p99':>8}{'ITL p50':>10}{'p99':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for server in servers:
        one = results.get((server.name, 1))
        for clients in levels:
            level = results[server.name, clients]
            rate = level.tokens / level.seconds
            scale = f"{rate / (one.tokens / one.seconds):.2f}x" if one else "-"
            print(f"{server.name:<20}{clients:>8}{rate:>10.1f}{scale:>12}"
                  f"{percentile(level.first, 0.5):>9.2f}s{percentile(level.first, 0.99):>7.2f}s"
                  f"{percentile(level.gaps, 0.5) * 1e3:>8.0f}ms"
                  f"{percentile(level.gaps, 0.99) * 1e3:>6.0f}ms")  # fmt: skip
    if len(servers) == 2:
        print("\nqkv serve / transformers serve, tokens/s: " + ", ".join(
            f"{c} clients {_rate(results, servers[0], c) / _rate(results, servers[1], c):.2f}x"
            for c in levels
        ))  # fmt: skip


def _rate(results: dict[tuple[str, int], Level], server: Server, clients: int) -> float:
    level = results[server.name, clients]
    return level.tokens / level.seconds


if __name__ == "__main__":
    main()
