"""Training throughput and quality: qkv vs Hugging Face GPT2LMHeadModel, same shape, same batches,
same optimizer, measured in one process.

  python benchmarks/train_throughput.py             (a) and (b): tokens/s, MFU, ratios
  python benchmarks/train_throughput.py --quality   (a) trained 2,000 steps: validation loss, time

(a) nanoGPT's CPU shape: 4 layers, 4 heads, d_model 128, context 64, batch 12, character-level
    on tinyshakespeare (../shared/data/tinyshakespeare.txt; skipped with a message if absent).
(b) GPT-2 small (124M): 12 layers, 12 heads, d_model 768, vocab 50257, 4 x 256 tokens a step.
MFU = model FLOPs per second (6 N + 12 L d T per token) / this machine's matmul peak, measured
here with a 2048^3 matmul in the same dtype.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from qkv.config import ModelConfig, TrainConfig
from qkv.data import Document, tokenize_split
from qkv.evaluation import next_token_loss
from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer
from qkv.train import flops_per_token, text_trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """Best of 5 square matmuls, FLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(side: str, config: ModelConfig) -> torch.nn.Module:
    """qkv's DecoderLM, or transformers' GPT2LMHeadModel of the same shape (GPT-2's own choices:
    learned positions, tanh GELU, biases, tied head, pre-norm)."""
    torch.manual_seed(0)
    if side == "qkv":
        return DecoderLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(hf_config)


def steps_per_second(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    warmup: int,
) -> float:
    """Training steps/s (forward, each library's own loss, backward, fused AdamW step) over
    `batches` after warmup. Hugging Face shifts `labels` itself, so it gets the inputs."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if isinstance(model, DecoderLM):
                loss = next_token_loss(model(x), y)
            else:
                loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x, y in batches[:warmup]:
        step(x, y)
    timed = batches[warmup:]
    seconds = _timed(lambda: [step(x, y) for x, y in timed])
    return len(timed) / seconds


def compare(
    name: str,
    config: ModelConfig,
    batches: list,
    dtypes: list[torch.dtype],
    peaks: dict,
    warmup: int,
    rounds: int,
) -> list[dict]:
    rows = []
    tokens = batches[0][0].numel()
    for dtype in dtypes:
        result = {}
        for side in ("qkv", "hf"):
            model = build(side, config)
            if side == "qkv":
                flops = flops_per_token(model, config.max_seq_len)
            rates = [steps_per_second(model, batches, dtype, warmup) for _ in range(rounds)]
            result[side] = statistics.median(rates)
            rows.append(
                {
                    "shape": name,
                    "impl": "qkv" if side == "qkv" else "HF GPT2LMHeadModel",
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms/step": 1000 / result[side],
                    "tokens/s": result[side] * tokens,
                    "MFU": result[side] * tokens * flops / peaks[dtype],
                }
            )
            del model
            gc.collect()
        rows[-2]["vs HF"] = result["qkv"] / result["hf"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'shape':<22}{'implementation':<22}{'dtype':<10}{'ms/step':>9}{'tokens/s':>10}"
        f"{'MFU':>8}{'qkv / HF':>10}"
    )
    for r in rows:
        ratio = f"{r['vs HF']:.2f}x" if "vs HF" in r else ""
        print(
            f"{r['shape']:<22}{r['impl']:<22}{r['dtype']:<10}{r['ms/step']:>9.1f}"
            f"{r['tokens/s']:>10,.0f}{r['MFU']:>8.1%}{ratio:>10}"
        )


def nanogpt_shape(vocab_size: int, **choices: object) -> ModelConfig:
    """nanoGPT's CPU model: 4 layers, 4 heads, d_model 128, context 64."""
    return ModelConfig(
        d_model=128, n_heads=4, n_layers=4, max_seq_len=64, vocab_size=vocab_size, **choices
    )


def shakespeare_tokens() -> tuple[Tokenizer, torch.Tensor, list[Document], list[Document]]:
    """nanoGPT's split: the first 90% of the characters train, the last 10% validate."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train, val = [Document("train", text[:cut])], [Document("val", text[cut:])]
    tokenizer = Tokenizer.train_char([text])
    return tokenizer, torch.tensor(tokenizer.encode(text[:cut])), train, val


def random_batches(tokens: torch.Tensor, n: int, batch: int, context: int) -> list:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - context - 1, (batch, 1), generator=generator)
        window = tokens[starts + torch.arange(context + 1)]
        out.append((window[:, :-1], window[:, 1:]))
    return out


def throughput() -> None:
    torch.set_flush_denormal(True)
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    peaks = {dtype: matmul_peak(dtype) for dtype in dtypes}
    print(
        f"machine: {torch.get_num_threads()} threads; matmul peak "
        + ", ".join(f"{str(d)[6:]} {peak / 1e9:.0f} GFLOP/s" for d, peak in peaks.items())
        + ("" if len(dtypes) > 1 else "; bf16 skipped: this CPU has no native bf16 matmul")
    )
    rows = []
    if SHAKESPEARE.is_file():
        tokenizer, tokens, _, _ = shakespeare_tokens()
        config = nanogpt_shape(tokenizer.vocab_size, feed_forward="gelu_tanh")
        batches = random_batches(tokens, 110, 12, 64)
        rows += compare("(a) nanoGPT CPU shape", config, batches, [torch.float32], peaks, 10, 3)
    else:
        print(f"skipping (a): {SHAKESPEARE} is absent")
    config = ModelConfig.preset("gpt2-small", max_seq_len=256)
    tokens = torch.randint(0, config.vocab_size, (100_000,))
    batches = random_batches(tokens, 4, 4, 256)
    rows += compare("(b) GPT-2 small", config, batches, dtypes, peaks, 1, 1)
    print_table(rows)


def quality() -> None:
    """2,000 steps at nanoGPT's shakespeare-char CPU settings; validation loss over the whole
    held-out 10% (nanoGPT reports 1.88-1.89 after the same steps)."""
    if not SHAKESPEARE.is_file():
        print(f"skipping the quality run: {SHAKESPEARE} is absent")
        return
    tokenizer, _, train, val = shakespeare_tokens()
    config = nanogpt_shape(tokenizer.vocab_size, bias=False)
    cfg = TrainConfig(
        steps=2000,
        batch_size=12,
        context=64,
        lr=1e-3,
        min_lr_ratio=0.1,
        warmup_steps=100,
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        eval_every=2000,
        eval_windows=10**9,
        save_every=10**9,
        dtype="float32",
        seed=1337,
    )
    torch.manual_seed(cfg.seed)
    model = DecoderLM(config)
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = text_trainer(
            model,
            tokenizer,
            tokenize_split(train, tokenizer, "train"),
            tokenize_split(val, tokenizer, "val"),
            cfg,
            Path(run_dir),
        )
        marks = {}
        trainer.on_step = lambda info: marks.__setitem__("trained", time.perf_counter())
        start = time.perf_counter()
        history = trainer.run()
    seconds = marks["trained"] - start
    final = [h for h in history if "val_loss" in h][-1]
    print(
        f"(a) 2,000 steps at nanoGPT's settings: validation loss {final['val_loss']:.4f} "
        f"({final['val_bits_per_byte']:.3f} bits/char) in {seconds:.1f} s of training "
        f"({1000 * seconds / cfg.steps:.1f} ms/step); nanoGPT: 1.89 in 84 s on these machines"
    )
    if not math.isfinite(final["val_loss"]):
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true", help="the 2,000-step quality run")
    args = parser.parse_args()
    quality() if args.quality else throughput()


if __name__ == "__main__":
    main()
