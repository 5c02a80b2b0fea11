"""The trainer: schedule, decay groups, learning, exact resume, non-finite loss, crash safety."""

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import load_model, resolve
from qkv.config import ModelConfig, TrainConfig
from qkv.data import prepare_corpus
from qkv.errors import QkvError
from qkv.evaluation import evaluate
from qkv.model import DecoderLM
from qkv.optim import lr_at, parameter_groups
from qkv.train import NonFiniteLoss, Run, Trainer, prepare_run, text_trainer, train

SMALL = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, dropout=0.1)


def small_setup(corpus_dir: Path, out: Path, **changes) -> Run:
    settings = dict(
        data=[str(corpus_dir)],
        tokenizer="char",
        val_fraction=0.2,
        steps=8,
        batch_size=4,
        context=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        save_every=4,
        eval_windows=8,
        seed=0,
    )
    return prepare_run(out, TrainConfig(**{**settings, **changes}), SMALL)


def small_run(corpus_dir: Path, out: Path, **changes) -> Trainer:
    return small_setup(corpus_dir, out, **changes).trainer


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = DecoderLM(ModelConfig(d_model=16, n_heads=2, n_layers=1, vocab_size=20))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "embedder.token_embedding.weight" in skipped
    assert "embedder.position.weight" in skipped
    assert all("norm" in n or n.endswith("bias") or "embed" in n for n in skipped)
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1


def test_training_lowers_the_validation_loss(corpus_dir, tmp_path):
    run = small_setup(corpus_dir, tmp_path / "run", steps=60, eval_every=60, save_every=60)
    trainer = run.trainer
    before = trainer.evaluate().loss
    history = trainer.run()
    after = [h for h in history if "val_loss" in h][-1]
    assert after["val_loss"] < before - 1.0
    assert after["val_bits_per_byte"] == pytest.approx(
        after["val_loss"] / (math.log(2) * run.corpus.val.bytes_per_token)
    )
    assert all(h["grad_norm"] > 0 for h in history if "grad_norm" in h)


def test_resume_is_exact(corpus_dir, tmp_path):
    straight = small_run(corpus_dir, tmp_path / "straight")
    straight.run()
    first_half = small_run(corpus_dir, tmp_path / "halves")

    def stop_after_four(info):
        if info.step == 4:
            first_half._stop_requested = True

    first_half.on_step = stop_after_four
    with pytest.raises(KeyboardInterrupt):
        first_half.run()
    resumed = prepare_run(
        tmp_path / "halves", TrainConfig(**first_half.cfg.__dict__), resume=tmp_path / "halves"
    ).trainer
    assert resumed.step == 4
    resumed.run()
    losses = [h["loss"] for h in straight.history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.history if "loss" in h]
    assert len(resumed_losses) == 8
    assert resumed_losses == losses


def test_timing_a_step_leaves_the_run_as_it_was(corpus_dir, tmp_path):
    plain = small_run(corpus_dir, tmp_path / "plain")
    plain.run()
    timed = small_run(corpus_dir, tmp_path / "timed")
    assert timed.seconds_per_step(repeats=1, warmup=1) > 0
    timed.run()
    keys = ("step", "loss", "lr", "grad_norm")  # not tokens/s: that is the machine's
    records = [[[h[k] for k in keys] for h in t.history if "loss" in h] for t in (timed, plain)]
    assert records[0] == records[1]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus_dir, tmp_path):
    trainer = small_run(corpus_dir, tmp_path / "run", steps=12, save_every=4, eval_every=100)

    def poison(info):
        if info.step == 6:
            with torch.no_grad():
                trainer.model.head.tied_to[0].weight.fill_(float("nan"))

    trainer.on_step = poison
    with pytest.raises(NonFiniteLoss, match="at step 7"):
        trainer.run()
    assert resolve(tmp_path / "run").name == "step-00000004"
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_context_longer_than_the_model_is_refused(corpus_dir, tmp_path):
    with pytest.raises(QkvError, match="max_seq_len"):
        text_trainer(
            DecoderLM(SMALL.replace(vocab_size=300)),
            *_corpus_parts(corpus_dir),
            TrainConfig(context=64),
            tmp_path,
        )


def _corpus_parts(corpus_dir):
    corpus = prepare_corpus([str(corpus_dir)], "char", val_fraction=0.2)
    return corpus.tokenizer, corpus.train, corpus.val


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import qkv.checkpoint as checkpoint
from qkv.config import ModelConfig, TrainConfig
from qkv.train import prepare_run

cfg = TrainConfig(
    data=[sys.argv[1]], tokenizer="char", val_fraction=0.2,
    steps=4, batch_size=2, context=16, eval_every=100, save_every=2, seed=0,
)
config = ModelConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=16)
run = prepare_run(Path(sys.argv[2]), cfg, config)
trainer = run.trainer
real_save = checkpoint.save_file

def save_then_die(tensors, path, metadata=None):
    if "step-00000004" in str(path):
        Path(path).write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(tensors, path, metadata=metadata)

checkpoint.save_file = save_then_die
trainer.run()
"""


def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(corpus_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(corpus_dir), str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert resolve(run).name == "step-00000002"
    model, tokenizer = load_model(run)
    corpus = prepare_corpus([str(corpus_dir)], tokenizer, val_fraction=0.2)
    assert math.isfinite(evaluate(model, corpus.val, 16, max_windows=4).loss)
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert "step-00000004" not in leftovers


def test_resume_from_an_older_checkpoint_trains_a_new_branch(corpus_dir, tmp_path):
    run = tmp_path / "run"
    small_run(corpus_dir, run).run()
    newest = run / "checkpoints" / "step-00000008" / "model.safetensors"
    before = newest.read_bytes()
    cfg = TrainConfig(**{**small_run(corpus_dir, tmp_path / "x").cfg.__dict__, "lr": 1e-2})
    branch = prepare_run(run, cfg, resume=run / "checkpoints" / "step-00000004").trainer
    branch.run()
    assert newest.read_bytes() != before
    assert resolve(run).name == "step-00000008"


def test_resume_applies_the_hyper_parameters_given_now(corpus_dir, tmp_path):
    run = tmp_path / "run"
    small_run(corpus_dir, run, steps=4, save_every=4).run()
    cfg = TrainConfig(
        **{**small_run(corpus_dir, tmp_path / "x").cfg.__dict__, "weight_decay": 0.0, "beta2": 0.5}
    )
    resumed = prepare_run(run, cfg, resume=run).trainer
    decay, no_decay = resumed.optimizer.param_groups
    assert decay["weight_decay"] == 0.0 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.5)


def test_resume_refuses_a_finished_run_and_another_runs_directory(corpus_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    small_run(corpus_dir, first, steps=4, save_every=4).run()
    small_run(corpus_dir, second, steps=4, save_every=4).run()
    cfg = small_run(corpus_dir, tmp_path / "x", steps=4).cfg
    with pytest.raises(QkvError, match="already at step 4"):
        prepare_run(first, cfg, resume=first)
    with pytest.raises(QkvError, match="holds another training run"):
        prepare_run(second, TrainConfig(**{**cfg.__dict__, "steps": 8}), resume=first)
    assert resolve(second).name == "step-00000004"


GRACE = """
import sys, time
from qkv.config import ModelConfig
from qkv.train import train

def start(run):
    run.trainer.stop_grace = 0.5

    def on_step(info):
        if info.step == 2:  # a step that does not end (as one of a huge batch would not)
            print("long step", flush=True)
            time.sleep(600)

    run.trainer.on_step = on_step

model = ModelConfig(d_model=32, n_layers=1, n_heads=2)
train(sys.argv[1], model_config=model, data=[sys.argv[2]], tokenizer="char", steps=5,
      batch_size=2, context=16, save_every=1, eval_every=100, eval_windows=2, on_start=start)
"""


@pytest.mark.slow
def test_a_step_running_past_the_grace_period_after_sigterm_exits_at_once(corpus_dir, tmp_path):
    """SIGTERM during a step that does not end: the process exits after the grace period with
    128 + 15, saying so; the checkpoint saved before it is whole and the run resumes."""
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", GRACE, str(run), str(corpus_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "long step\n"
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "did not end within 0.5 s of SIGTERM; exiting now, without saving" in stderr
    assert "step 1 is kept" in stderr
    assert resolve(run).name == "step-00000001"
    assert train(resume=run, steps=3).trainer.step == 3  # the lock went with it; it resumes
