"""The speedrun's levers against their formulas (Muon, ReLU^2, QK-norm, soft-cap, zero init,
warmup-stable-decay), --target-loss, --val-data, recipes and the exact resume of a Muon run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from qkv.config import RECIPES, ModelConfig, TrainConfig, recipe
from qkv.errors import QkvError
from qkv.model import DecoderLM
from qkv.nn.recording import recording
from qkv.optim import Muon, lr_scale, muon_matrices, orthogonalize
from qkv.train import prepare_run

SMALL = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, position="rope")


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (3, 48, 16)])
def test_orthogonalize_gives_singular_values_near_one_along_u_v_transposed(shape) -> None:
    """G = U S V^T with singular values spread over [1, 10]: Newton-Schulz's result has every
    singular value in about [0.7, 1.2] and the same U V^T (the polar factor Muon's update
    approximates). (A value below about 0.3% of |G|_F is not lifted that far in five steps.)"""
    torch.manual_seed(0)
    *batch, rows, cols = shape
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, min(rows, cols)))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, min(rows, cols)))
    spread = torch.linspace(1.0, 10.0, min(rows, cols))[torch.randperm(min(rows, cols))]
    g = u @ torch.diag_embed(spread.expand(*batch, -1)) @ v.mT
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.65 and singular.max() < 1.25
    polar = u @ v.mT
    cosine = (out * polar).sum((-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.97).all()
    if batch:  # a stack is each matrix on its own
        torch.testing.assert_close(out[1], orthogonalize(g[1]), atol=1e-5, rtol=0)


def test_a_muon_step_follows_its_formula() -> None:
    """m = mu m + g; W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(g + mu m)."""
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 16))
    start = tall.detach().clone()
    optimizer = Muon([tall], lr=0.1, momentum=0.9, weight_decay=0.5)
    grads = [torch.randn(48, 16), torch.randn(48, 16)]
    expected, buffer = start.clone(), torch.zeros(48, 16)
    for g in grads:
        tall.grad = g.clone()
        optimizer.step()
        buffer = 0.9 * buffer + g
        update = orthogonalize(g + 0.9 * buffer)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(48 / 16) * update
    torch.testing.assert_close(tall.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(optimizer.state[tall]["momentum_buffer"], buffer)


def test_muon_takes_the_blocks_matrices_only() -> None:
    model = DecoderLM(SMALL.replace(vocab_size=40, tie_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in muon_matrices(model)}
    assert chosen == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")
    }
    assert "head.weight" not in chosen and "embedder.token_embedding.weight" not in chosen


def test_relu2_softcap_and_zero_init_follow_their_formulas() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 40)
    config = SMALL.replace(vocab_size=40, feed_forward="relu2")
    model = DecoderLM(config)
    block = model.blocks[0].feed_forward
    h = torch.randn(3, 32)
    torch.testing.assert_close(block(h), block.w2(F.relu(block.w1(h)) ** 2))

    capped = DecoderLM(config.replace(logit_softcap=2.0))
    capped.load_state_dict(model.state_dict())
    ids = x.argmax(-1)
    raw, bounded = model(ids), capped(ids)
    torch.testing.assert_close(bounded, 2.0 * torch.tanh(raw / 2.0))
    assert bounded.abs().max() < 2.0

    zero = DecoderLM(config.replace(zero_init=True, tie_embeddings=False))
    assert all(
        (p == 0).all() for n, p in zero.named_parameters() if n.endswith(("o_proj.weight",
                                                                          "w2.weight"))
    )  # fmt: skip
    logits = zero(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert loss.item() == pytest.approx(math.log(40))  # the uniform guess


def test_qk_norm_normalises_each_head_and_ignores_the_scale_of_w_q() -> None:
    """Q_h <- Q_h / sqrt(mean(Q_h^2) + eps) (gain 1 at init), K_h likewise: so with a tiny eps
    scaling W_Q or W_K by 10 changes nothing downstream."""
    torch.manual_seed(0)
    model = DecoderLM(SMALL.replace(vocab_size=40, qk_norm=True, norm_eps=1e-10)).eval()
    ids = torch.randint(0, 40, (1, 10))
    with recording(model) as records:
        before = model(ids)
    values = {(r.module, r.name): r.value for r in records}
    for layer in range(2):
        for raw, normed in (("query", "normed_query"), ("key", "normed_key")):
            where = f"blocks.{layer}.self_attention"
            x = values[(where, raw)]
            expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-10)
            torch.testing.assert_close(values[(where, normed)], expected)
    with torch.no_grad():
        for block in model.blocks:
            block.self_attention.q_proj.weight.mul_(10)
            block.self_attention.k_proj.weight.mul_(10)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=0)


def test_warmup_stable_decay_holds_the_peak_then_falls_linearly_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.3,
                      min_lr_ratio=0.0)  # fmt: skip
    assert lr_scale(0, cfg) == pytest.approx(0.1) and lr_scale(9, cfg) == pytest.approx(1.0)
    assert all(lr_scale(s, cfg) == 1.0 for s in range(10, 71))
    assert lr_scale(85, cfg) == pytest.approx(0.5) and lr_scale(100, cfg) == pytest.approx(0.0)
    with pytest.raises(QkvError, match="--schedule must be cosine or wsd"):
        TrainConfig(schedule="linear").validate()


def _settings(corpus_dir: Path, **changes) -> TrainConfig:
    base = dict(data=[str(corpus_dir)], tokenizer="char", val_fraction=0.2, steps=12,
                batch_size=4, context=32, lr=3e-3, warmup_steps=2, eval_every=3,
                save_every=100, eval_windows=8, seed=0, optimizer="muon",
                schedule="wsd")  # fmt: skip
    return TrainConfig(**{**base, **changes})


def test_target_loss_stops_at_the_first_evaluation_at_or_below_it(corpus_dir, tmp_path):
    full = prepare_run(tmp_path / "full", _settings(corpus_dir), SMALL).trainer
    full.run()
    evals = [(h["step"], h["val_loss"]) for h in full.history if "val_loss" in h]
    assert [s for s, _ in evals] == [3, 6, 9, 12]
    assert evals[1][1] < evals[0][1]
    target = (evals[0][1] + evals[1][1]) / 2  # met at step 6, not at step 3
    run = prepare_run(tmp_path / "stop", _settings(corpus_dir, target_loss=target), SMALL)
    run.trainer.run()
    assert run.trainer.reached is not None and run.trainer.reached[0] == 6
    assert run.trainer.step == 6 and run.trainer.saved_step == 6
    assert (tmp_path / "stop" / "checkpoints" / "step-00000006").is_dir()
    assert [h["step"] for h in run.trainer.history if "val_loss" in h] == [3, 6]


def test_a_muon_run_resumes_exactly(corpus_dir, tmp_path):
    """Stopped at a target loss, then resumed without it: the same losses as one straight run,
    Muon's momentum coming back from the checkpoint (tensors, no pickle)."""
    straight = prepare_run(tmp_path / "straight", _settings(corpus_dir), SMALL).trainer
    straight.run()
    first = prepare_run(tmp_path / "halves", _settings(corpus_dir, target_loss=100.0), SMALL)
    first.trainer.run()
    assert first.trainer.step == 3
    state = tmp_path / "halves" / "checkpoints" / "step-00000003"
    saved = json.loads((state / "trainer_state.json").read_text())
    assert [g["name"] for g in saved["param_groups"]] == [
        "muon",
        "no_decay",
    ]  # tied head: no other matrix
    resumed = prepare_run(tmp_path / "halves", _settings(corpus_dir), resume=tmp_path / "halves")
    assert resumed.trainer.step == 3
    resumed.trainer.run()
    losses = [h["loss"] for h in straight.history if "loss" in h]
    assert [h["loss"] for h in resumed.trainer.history if "loss" in h] == losses


def test_val_data_is_scored_whole(corpus_dir, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    run = prepare_run(tmp_path / "run", _settings(corpus_dir, val_data=[str(val)], steps=3),
                      SMALL)  # fmt: skip
    assert len(run.corpus.val.tokens) == len(val.read_text()) + 1  # one document, one E
    result = run.trainer.evaluate()
    windows = len(val.read_text()) // 32
    assert result.tokens == windows * 32


def test_recipes_are_models_and_settings_that_options_override(corpus_dir, tmp_path, qkv_here):
    model, cfg = recipe("nanogpt")
    assert (model.d_model, model.n_layers, model.n_heads, model.bias) == (128, 4, 4, False)
    assert (cfg.batch_size, cfg.context, cfg.steps, cfg.beta2, cfg.lr) == (12, 64, 2000, 0.99,
                                                                          1e-3)  # fmt: skip
    assert set(RECIPES) == {"nanogpt", "speedrun"}
    out = tmp_path / "run"
    result = qkv_here("train", "--recipe", "speedrun", "--data", str(corpus_dir), "--steps", "2",
                      "--set", "n_layers=1", "--batch-size", "2", "--eval-windows", "2",
                      "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "latest" / "config.json").read_text())
    assert config["n_layers"] == 1 and config["qk_norm"] and config["feed_forward"] == "relu2"
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    train = state["train_config"]
    assert train["batch_size"] == 2 and train["optimizer"] == "muon" and train["steps"] == 2
    refused = qkv_here("train", "--recipe", "fast", "--data", str(corpus_dir))
    assert refused.returncode == 2 and "invalid choice: 'fast'" in refused.stderr
