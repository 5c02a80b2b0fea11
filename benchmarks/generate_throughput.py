"""Generation throughput: qkv's decoding vs Hugging Face GPT2LMHeadModel.generate on the same
weights and prompts, greedy, measured in one process.

  python benchmarks/generate_throughput.py           GPT-2 small shape (124M), random weights
  python benchmarks/generate_throughput.py --quick   the same with 2 layers, for a fast look

Rows: batch 1 and 8 with the KV cache (128 new tokens after a 32-token prompt; medians of 3
turns each), then without it (256 new tokens at batch 1, 32 at batch 8; one turn). Time to first
token (TTFT) is a run with one new token; decode tokens/s counts the tokens after the first, over
all rows. The bandwidth bound is
what decoding one token at a time can reach at best: every weight is read once per step, so
tokens/s <= copy bandwidth / weight bytes, with the bandwidth measured here as STREAM counts a
copy (bytes read + bytes written per second).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qkv.generate import GenerationConfig, decode
from qkv.hf import from_gpt2

PROMPT = 32


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
    """Bytes of the weights one decode step reads: all of them except the position table (one
    row is read); the tied token table counts once, read whole by the output head."""
    position = model.embedder.position
    return sum(p.numel() * p.element_size() for p in model.parameters()) - (
        position.weight.numel() * position.weight.element_size() if position is not None else 0
    )


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


def measure(runs: dict, prompts: torch.Tensor, new: int, cache: bool, rounds: int) -> dict:
    """Per implementation: TTFT (a one-token run) and decode tokens/s of the rest of a full run,
    the implementations taking turns `rounds` times (medians: this shared machine is noisy)."""
    samples: dict[str, list] = {name: [] for name in runs}
    tokens = {}
    for run, model in runs.values():  # warm up: the first runs in a process are slower
        run(model, prompts, min(new, 32), cache)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 12")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2 if args.quick else 12)).eval()
    ours = from_gpt2(hf)
    bandwidth = copy_bandwidth()
    weight_bytes = weight_bytes_per_token(ours)
    bound = bandwidth / weight_bytes
    print(
        f"GPT-2 small shape, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters "
        f"(float32, {weight_bytes / 1e6:.0f} MB read per decode step), "
        f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(read + write) -> bound {bound:.1f} tokens/s at batch 1"
    )
    prompts = torch.randint(0, hf.config.vocab_size, (8, PROMPT), generator=torch.Generator())
    rows = [(1, True, 128, 3), (8, True, 128, 3), (1, False, 256, 1), (8, False, 32, 1)]
    print(
        f"{'batch':>5} {'cache':>6} {'new':>4}  {'impl':<5}{'TTFT ms':>9}{'tokens/s':>10}"
        f"{'qkv / HF':>10}{'of bound':>10}  same tokens"
    )
    runs = {"qkv": (run_qkv, ours), "HF": (run_hf, hf)}
    for batch, cache, new, rounds in rows:
        results = measure(runs, prompts[:batch], new, cache, rounds)
        same = "yes" if results["qkv"]["tokens"] == results["HF"]["tokens"] else "NO"
        for name, r in results.items():
            ratio = f"{r['tokens/s'] / results['HF']['tokens/s']:.2f}x" if name == "qkv" else ""
            share = f"{r['tokens/s'] / bound:.0%}" if batch == 1 and cache else ""
            print(
                f"{batch:>5} {'yes' if cache else 'no':>6} {new:>4}  {name:<5}"
                f"{1000 * r['ttft']:>9.1f}{r['tokens/s']:>10.1f}{ratio:>10}{share:>10}"
                f"  {same if name == 'qkv' else ''}"
            )


if __name__ == "__main__":
    main()
