"""Generation throughput: qkv's decoding vs Hugging Face's generate on the same weights and
prompts, greedy, measured in one process, for two shapes: GPT-2 small and TinyLlama 1.1B.

  python benchmarks/generate_throughput.py                  both shapes (about 10 minutes)
  python benchmarks/generate_throughput.py --shape gpt2     GPT-2 small shape (124M) only
  python benchmarks/generate_throughput.py --quick          2 layers each, for a fast look

GPT-2 small (random weights, built in memory): batch 1 and 8 with the KV cache (128 new tokens
after a 32-token prompt; medians of 3 turns each), then without it (256 new tokens at batch 1,
32 at batch 8; one turn). TinyLlama 1.1B shape (random weights: a Llama of 22 layers, d_model
2048, 32 heads sharing 4 KV heads, d_ff 5632, vocab 32000, untied head), saved as a Hugging Face
directory in float32 (4.4 GB, in a temporary directory) and loaded from it the way each tool
loads a download (qkv's load_for_inference, transformers' from_pretrained): batch 1 and 8, a
128-token prompt, 128 new tokens, one turn. Its load time and peak memory are measured each in a
fresh process (imports excluded from the time; peak RSS counts everything, imports included,
after loading and generating 8 tokens for each of 8 prompts), best of 2.

Time to first token (TTFT) is a run with one new token; decode tokens/s counts the tokens after
the first. The bandwidth bound is what decoding can reach at best when every step reads all it
needs once: the weights (all but the position table and an untied token table, of which a few
rows are read) plus the KV cache of every sequence at the mean context, at the copy bandwidth
measured here as STREAM counts it (bytes read + bytes written per second): tokens/s <= batch x
bandwidth / bytes per step. At batch 8 the matrix products are no longer bound by bandwidth alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qkv.checkpoint import load_for_inference
from qkv.generate import GenerationConfig, decode
from qkv.hf import from_gpt2

GPT2_PROMPT, LLAMA_PROMPT, NEW = 32, 128, 128
TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
)  # fmt: skip
# Run in a fresh process: load a directory the way qkv or transformers does, then generate 8
# tokens for 8 prompts of 128; prints the load seconds (imports excluded) and the peak RSS in
# bytes (VmHWM: ru_maxrss would count the parent's size at fork).
LOAD = """
import json, re, sys, time, torch
implementation, folder = sys.argv[1:]
prompt = torch.randint(3, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
def rss(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
if implementation == "qkv":
    from qkv.checkpoint import load_for_inference
    from qkv.generate import GenerationConfig, decode
    base, start = rss("VmRSS"), time.perf_counter()
    model, tokenizer, _ = load_for_inference(folder, torch.device("cpu"))
    seconds = time.perf_counter() - start
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    steps = decode(model, prompt.tolist(), config, pad_id=0)
    tokens = [token for _, (token, _) in zip(range(8), steps)]
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, start = rss("VmRSS"), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                       do_sample=False, pad_token_id=0)
print(json.dumps({"seconds": seconds, "peak": rss("VmHWM"), "base": base}))
"""


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes read + written per second copying a large float32 tensor (best of 5)."""
    source = torch.randn(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(5))
    return 2 * source.numel() * 4 / best


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: all of them but the position table and an
    untied token table (a row of each is read); a tied token table counts once, read whole by
    the output head."""
    embedder = model.embedder
    unread = [] if embedder.position is None else [embedder.position.weight]
    if not model.config.tie_embeddings:
        unread.append(embedder.token_embedding.weight)
    return sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
        t.numel() * t.element_size() for t in unread
    )


def cache_bytes_per_position(model: torch.nn.Module) -> int:
    """Bytes of the KV cache per position of one sequence: K and V of every layer."""
    config = model.config
    element = next(model.parameters()).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element


def bound(model: torch.nn.Module, bandwidth: float, batch: int, prompt: int, new: int) -> float:
    """tokens/s <= batch x bandwidth / (weight bytes + batch x cache bytes at the mean context)."""
    context = prompt + (new - 1) / 2
    step = weight_bytes_per_token(model) + batch * context * cache_bytes_per_position(model)
    return batch * bandwidth / step


def run_qkv(model, prompts: torch.Tensor, new: int, cache: bool) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=new, temperature=0, use_cache=cache)
    steps = decode(model, prompts.tolist(), config, pad_id=0)
    tokens = [token for _, (token, _) in zip(range(new), steps, strict=False)]
    return torch.stack(tokens, dim=1).tolist()


@torch.inference_mode()
def run_hf(model, prompts: torch.Tensor, new: int, cache: bool) -> list[list[int]]:
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        use_cache=cache,
        pad_token_id=0,
    )
    return out[:, prompts.shape[1] :].tolist()


def measure(
    runs: dict, prompts: torch.Tensor, new: int, cache: bool, rounds: int, warmup: int
) -> dict:
    """Per implementation: TTFT (a one-token run) and decode tokens/s of the rest of a full run,
    the implementations taking turns `rounds` times (medians: this shared machine is noisy)."""
    samples: dict[str, list] = {name: [] for name in runs}
    tokens = {}
    for run, model in runs.values():  # warm up: the first runs in a process are slower
        run(model, prompts, warmup, cache)
    for _ in range(rounds):
        for name, (run, model) in runs.items():
            ttft = _timed(lambda: run(model, prompts, 1, cache))  # noqa: B023
            start = time.perf_counter()
            tokens[name] = run(model, prompts, new, cache)
            decode_seconds = max(time.perf_counter() - start - ttft, 1e-9)
            samples[name].append((ttft, prompts.shape[0] * (new - 1) / decode_seconds))
    return {
        name: {
            "ttft": statistics.median(t for t, _ in values),
            "tokens/s": statistics.median(r for _, r in values),
            "tokens": tokens[name],
        }
        for name, values in samples.items()
    }


def print_rows(
    runs: dict, bandwidth: float, prompts: torch.Tensor, rows: list, warmup: int
) -> None:
    """The table: one line per (batch, cache, new tokens) row and implementation."""
    print(
        f"{'batch':>5} {'cache':>6} {'prompt':>6} {'new':>4}  {'impl':<5}{'TTFT ms':>9}"
        f"{'tokens/s':>10}{'qkv / HF':>10}{'bound':>8}{'of bound':>10}  same tokens"
    )
    ours = runs["qkv"][1]
    for batch, cache, new, rounds in rows:
        results = measure(runs, prompts[:batch], new, cache, rounds, warmup)
        same = "yes" if results["qkv"]["tokens"] == results["HF"]["tokens"] else "NO"
        ceiling = bound(ours, bandwidth, batch, prompts.shape[1], new) if cache else None
        for name, r in results.items():
            ratio = f"{r['tokens/s'] / results['HF']['tokens/s']:.2f}x" if name == "qkv" else ""
            share = f"{r['tokens/s'] / ceiling:.0%}" if ceiling else ""
            limit = f"{ceiling:.1f}" if ceiling else ""
            print(
                f"{batch:>5} {'yes' if cache else 'no':>6} {prompts.shape[1]:>6} {new:>4}  "
                f"{name:<5}{1000 * r['ttft']:>9.1f}{r['tokens/s']:>10.1f}{ratio:>10}{limit:>8}"
                f"{share:>10}  {same if name == 'qkv' else ''}"
            )


def describe(model: torch.nn.Module, name: str, bandwidth: float) -> None:
    count = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name} shape, {count / 1e6:.0f}M parameters (float32, "
        f"{weight_bytes_per_token(model) / 1e6:.0f} MB of weights read per decode step), "
        f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(read + write)"
    )


def gpt2(layers: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=layers)).eval()
    ours = from_gpt2(hf)
    bandwidth = copy_bandwidth()
    describe(ours, "GPT-2 small", bandwidth)
    prompts = torch.randint(0, hf.config.vocab_size, (8, GPT2_PROMPT), generator=torch.Generator())
    rows = [(1, True, NEW, 3), (8, True, NEW, 3), (1, False, 256, 1), (8, False, 32, 1)]
    print_rows({"qkv": (run_qkv, ours), "HF": (run_hf, hf)}, bandwidth, prompts, rows, 32)


def save_tinyllama(folder: Path, layers: int) -> int:
    """A random-weight TinyLlama-shaped LlamaForCausalLM saved to `folder` in float32, with a
    word-level tokenizer.json of its 32000 ids; returns the weights' bytes."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA | {"num_hidden_layers": layers}))
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 32000)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(folder / "tokenizer.json"))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_loads(folder: Path, weights: int) -> None:
    """Load time and peak RSS of each implementation, each in a fresh process, best of 2."""
    results: dict[str, list[dict]] = {"qkv": [], "HF": []}
    for _ in range(2):
        for name in results:
            done = subprocess.run(
                [sys.executable, "-c", LOAD, name.lower(), str(folder)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\nloading the directory ({weights / 1e9:.2f} GB of float32 weights), fresh processes")
    print(
        f"{'impl':<5}{'load s':>8}{'vs HF':>7}{'peak RSS GB':>13}{'/ weights':>11}"
        f"{'before loading GB':>19}"
    )
    hf_seconds = min(r["seconds"] for r in results["HF"])
    for name, runs in results.items():
        seconds = min(r["seconds"] for r in runs)
        peak, base = min(r["peak"] for r in runs), min(r["base"] for r in runs)
        print(
            f"{name:<5}{seconds:>8.2f}{seconds / hf_seconds:>6.2f}x{peak / 1e9:>13.2f}"
            f"{peak / weights:>10.2f}x{base / 1e9:>19.2f}"
        )


def tinyllama(layers: int) -> None:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="qkv-tinyllama-") as directory:
        folder = Path(directory)
        weights = save_tinyllama(folder, layers)
        measure_loads(folder, weights)
        ours, _, line = load_for_inference(folder, torch.device("cpu"))
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        print(line)
        bandwidth = copy_bandwidth()
        describe(ours, "TinyLlama 1.1B", bandwidth)
        prompts = torch.randint(3, 32000, (8, LLAMA_PROMPT), generator=torch.Generator())
        rows = [(1, True, NEW, 1), (8, True, NEW, 1)]
        print_rows({"qkv": (run_qkv, ours), "HF": (run_hf, hf)}, bandwidth, prompts, rows, 2)
        status = Path("/proc/self/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024
        print(f"this process's peak RSS with both models loaded: {peak / 1e9:.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers each, for a fast look")
    parser.add_argument("--shape", choices=["gpt2", "tinyllama", "all"], default="all")
    args = parser.parse_args()
    if args.shape in ("gpt2", "all"):
        gpt2(2 if args.quick else 12)
    if args.shape in ("tinyllama", "all"):
        tinyllama(2 if args.quick else TINYLLAMA["num_hidden_layers"])


if __name__ == "__main__":
    main()
