"""Distributed training throughput: `qkv train` in one process vs under torchrun with N processes
(DDP and FSDP2), the same global batch, the same steps; tokens/s and whether the losses agree.

  python benchmarks/distributed_throughput.py                      N = 2 on this machine's CPUs
  python benchmarks/distributed_throughput.py --nproc 8 --device cuda --preset gpt2-small \
      --batch-size 8 --context 1024 --steps 50                     a GPU node (NCCL)

Data: tinyshakespeare (../shared/data/tinyshakespeare.txt, characters), or builtin:stdlib-docs
when that file is absent. tokens/s is the median over the steps after the first five, read from
each run's metrics.jsonl; the one-process run uses all the machine's threads, each of the N
processes 1/N of them (torchrun's OMP_NUM_THREADS is overridden to that share).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def train(out: Path, args: argparse.Namespace, processes: int, strategy: str) -> list[dict]:
    """One `qkv train` run; its per-step records."""
    data = ["--data", str(SHAKESPEARE), "--tokenizer", "char"] if SHAKESPEARE.is_file() else []
    options = [
        "train", *data, "--preset", args.preset, "--context", str(args.context),
        "--steps", str(args.steps), "--eval-every", str(args.steps), "--eval-windows", "8",
        "--save-every", str(args.steps), "--device", args.device, "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ)
    if processes == 1:
        command = [sys.executable, "-m", "qkv", *options, "--batch-size", str(args.batch_size)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        per_process = args.batch_size // processes
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "qkv", *options,
            "--batch-size", str(per_process), "--grad-accum", str(processes),
            "--strategy", strategy,
        ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_second" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.batch_size % args.nproc:
        sys.exit("--batch-size must be a multiple of --nproc")
    if args.steps < 10:
        sys.exit("--steps must be at least 10 (the first five are not timed)")
    if not SHAKESPEARE.is_file():
        print(f"{SHAKESPEARE} is absent: using builtin:stdlib-docs")
    print(
        f"{args.preset}, global batch {args.batch_size} x {args.context} tokens, {args.steps} "
        f"steps, {args.device}, {os.cpu_count()} CPU threads"
    )
    runs = [("1 process", 1, "ddp"), (f"{args.nproc} x DDP", args.nproc, "ddp"),
            (f"{args.nproc} x FSDP2", args.nproc, "fsdp")]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, processes, strategy in runs:
            results[name] = train(Path(tmp) / name.replace(" ", ""), args, processes, strategy)
    base = results["1 process"]
    base_speed = statistics.median(r["tokens_per_second"] for r in base[5:])
    print("| run | tokens/s | vs 1 process | max loss difference vs 1 process |")
    print("| --- | --- | --- | --- |")
    for name, records in results.items():
        speed = statistics.median(r["tokens_per_second"] for r in records[5:])
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(base, records, strict=True))
        print(f"| {name} | {speed:,.0f} | {speed / base_speed:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
