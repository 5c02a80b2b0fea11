"""Speedrun: whole-process wall time of `qkv train` to validation loss 1.88 on tinyshakespeare
characters, nanoGPT's CPU recipe against qkv's speedrun recipe, measured in one run.

  python benchmarks/speedrun.py                 both recipes, the ablation, the second corpus
  python benchmarks/speedrun.py --rounds 1 --no-ablation --no-second
  python benchmarks/speedrun.py --profile       where a step's time goes, per recipe

nanoGPT's split: the first 90% of ../shared/data/tinyshakespeare.txt trains, the last 10% is
the validation text, all of it scored (`--val-data`); skipped with a message if absent. Each
run is a fresh `python -m qkv train --recipe NAME --target-loss 1.88` process; runs of the two
recipes alternate, and the table shows the median of --rounds each. The nanogpt recipe runs its
2,000 steps (it stops early only if it reaches the target). The ablation runs the speedrun
recipe with each kept lever removed in turn, and each rejected one added. The second corpus
(the standard library's docstrings, characters) checks the recipe is not tuned to one text:
speedrun's time to the nanogpt recipe's final validation loss there, against the nanogpt
recipe's whole run.
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
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TARGET = 1.88
# Each lever the speedrun recipe keeps, and the options that remove it (back to nanoGPT's
# choice); then each lever measured and not kept, and the options that add it.
ABLATION = {
    "- Muon (AdamW for every matrix)": ["--optimizer", "adamw"],
    "- RoPE (learned positions)": ["--set", "position=learned"],
    "- ReLU^2 (GELU)": ["--set", "feed_forward=gelu"],
    "- QK-norm": ["--set", "qk_norm=false"],
    "- batch 32 (12, nanoGPT's)": ["--batch-size", "12"],
    "+ zero-initialised projections": ["--set", "zero_init=true"],
    "+ untied head (zero-initialised)": [
        "--set",
        "tie_embeddings=false",
        "--set",
        "zero_init=true",
    ],
    "+ logit soft-cap 15": ["--set", "logit_softcap=15"],
    "+ warmup-stable-decay (the last half to 0)": ["--schedule", "wsd", "--min-lr-ratio", "0"],
}


def train(out: Path, recipe: str, data: list[str], extra: list[str]) -> dict[str, float | None]:
    """One `qkv train` process: its wall time, the step and seconds at which it reached the
    target (None if it did not), and its last validation loss."""
    command = [sys.executable, "-m", "qkv", "train", "--recipe", recipe, "--out", str(out),
               *data, *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"qkv train failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    reached = re.search(r"at step (\d+) after", done.stdout)
    return {
        "wall": wall,
        "step": int(reached.group(1)) if reached else None,
        "loss": losses[-1],
        "steps": max(r["step"] for r in records),
    }


def profile(name: str, steps: int = 20) -> None:
    """torch.profiler over `steps` training steps of recipe `name` on random tokens: the ops
    that take the most time, and the step's split into forward, backward and optimizer."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as profiler

    from qkv.config import recipe
    from qkv.evaluation import next_token_loss
    from qkv.model import DecoderLM
    from qkv.optim import build_optimizer

    model_config, cfg = recipe(name)
    model = DecoderLM(model_config.replace(vocab_size=66, max_seq_len=cfg.context))
    optimizer = build_optimizer(model, cfg, fused=True)
    torch.set_flush_denormal(True)

    def step() -> None:
        x = torch.randint(0, 66, (cfg.batch_size, cfg.context + 1))
        with record_function("forward"):
            loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    start = time.perf_counter()
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_step = (time.perf_counter() - start) / steps
    tokens = cfg.batch_size * cfg.context
    print(f"\nrecipe {name}: {per_step * 1e3:.1f} ms/step (profiled), {tokens} tokens a step, "
          f"{tokens / per_step:,.0f} tokens/s")  # fmt: skip
    events = {e.key: e for e in prof.key_averages()}
    for part in ("forward", "backward", "optimizer"):
        share = events[part].cpu_time_total / steps / 1e3
        print(f"  {part}: {share:.1f} ms/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each recipe (3)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation table")
    parser.add_argument("--no-second", action="store_true", help="skip the second corpus")
    parser.add_argument("--profile", action="store_true", help="profile a step of each recipe")
    args = parser.parse_args()
    if args.profile:
        for name in ("nanogpt", "speedrun"):
            profile(name)
        return
    if not SHAKESPEARE.is_file():
        print(f"skipped: {SHAKESPEARE} is absent (nanoGPT's tinyshakespeare.txt)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = SHAKESPEARE.read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        (root / "train.txt").write_text(text[:cut], encoding="utf-8")
        (root / "val.txt").write_text(text[cut:], encoding="utf-8")
        data = ["--data", str(root / "train.txt"), "--val-data", str(root / "val.txt"),
                "--target-loss", str(TARGET)]  # fmt: skip
        train(root / "warm", "speedrun", data, ["--steps", "2"])  # the tokenizer cache
        runs: dict[str, list[dict]] = {"nanogpt": [], "speedrun": []}
        for round_ in range(args.rounds):
            for recipe in runs:
                runs[recipe].append(train(root / f"{recipe}-{round_}", recipe, data, []))
                print(f"  {recipe} round {round_ + 1}: {runs[recipe][-1]}", flush=True)
        base = median(runs["nanogpt"], "wall")
        print(f"\ntinyshakespeare characters, time to validation loss {TARGET} (median of "
              f"{args.rounds}; whole process, wall clock)\n")  # fmt: skip
        print("| recipe | wall time | steps run | reached 1.88 at step | final val loss | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for recipe, done in runs.items():
            wall = median(done, "wall")
            steps = [r["step"] for r in done]
            reached = ", ".join("-" if s is None else str(s) for s in steps)
            print(f"| {recipe} | {wall:.1f} s | {median(done, 'steps'):.0f} | {reached} | "
                  f"{median(done, 'loss'):.4f} | {wall / base:.2f}x |")  # fmt: skip
        if not args.no_ablation:
            full = median(runs["speedrun"], "wall")
            print("\nablation: the speedrun recipe with one lever removed (-) or added (+), one "
                  "run each\n")  # fmt: skip
            print("| change | wall time | reached 1.88 at step | final val loss | vs speedrun |")
            print("| --- | --- | --- | --- | --- |")
            for number, (name, extra) in enumerate(ABLATION.items()):
                r = train(root / f"ablation-{number}", "speedrun", data, extra)
                reached = "not reached" if r["step"] is None else str(r["step"])
                print(f"| {name} | {r['wall']:.1f} s | {reached} | {r['loss']:.4f} | "
                      f"{r['wall'] / full:.2f}x |", flush=True)  # fmt: skip
        if not args.no_second:
            second = ["--data", "builtin:stdlib-docs", "--tokenizer", "char"]
            nano = train(root / "second-nanogpt", "nanogpt", second, [])
            goal = ["--target-loss", f"{nano['loss']:.4f}"]
            fast = train(root / "second-speedrun", "speedrun", second, goal)
            print(
                "\nsecond corpus: builtin:stdlib-docs, characters (its own 5% validation share)\n"
            )
            print("| recipe | wall time | final val loss | reached nanogpt's loss at | ratio |")
            print("| --- | --- | --- | --- | --- |")
            print(f"| nanogpt | {nano['wall']:.1f} s | {nano['loss']:.4f} | - | 1.00x |")
            reached = "not reached" if fast["step"] is None else str(fast["step"])
            print(f"| speedrun | {fast['wall']:.1f} s | {fast['loss']:.4f} | {reached} | "
                  f"{fast['wall'] / nano['wall']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
