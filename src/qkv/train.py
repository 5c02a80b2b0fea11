"""The training loop: AdamW with weight-decay groups, warmup + cosine schedule, gradient clipping,
accumulation, bf16 autocast, periodic evaluation and atomic checkpoints, resumable exactly.

The loop is built from parts: what makes the batches (windows of a corpus, fine-tuning examples,
source/target pairs) and what evaluates (qkv.evaluation.score over held-out data); every run
writes metrics.jsonl and loss.png (qkv.metrics) beside its checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from qkv import distributed
from qkv.checkpoint import (
    ADAPTER,
    CONFIG,
    LATEST,
    TOKENIZER,
    WEIGHTS,
    check_run_directory,
    check_vocabulary,
    load_adapter_weights,
    load_config,
    load_training_state,
    load_weights,
    read_run,
    resolve,
    save_training_checkpoint,
)
from qkv.config import ModelConfig, TrainConfig
from qkv.data import Batches, Corpus, TokenFile, absolute_specs, prepare_corpus
from qkv.device import keep_freed_memory, resolve_device, resolve_dtype
from qkv.distributed import (
    ONE_PROCESS,
    World,
    device_for,
    gradient_sync,
    shard_as,
    split_batch,
    whole,
    wrap,
)
from qkv.errors import QkvError
from qkv.evaluation import EvalResult, Inputs, evaluate, next_token_loss
from qkv.files import one_writer
from qkv.memory import check_fits, check_model_fits, training_parts
from qkv.metrics import record
from qkv.model import DecoderLM, build_model
from qkv.optim import build_optimizer, lookup_tables, lr_scale
from qkv.tokenizer import Tokenizer


def matmul_parameters(model: DecoderLM) -> int:
    """Parameters that take part in a matmul: all but lookup tables, plus the head's matrix."""
    lookups = sum(p.numel() for p in lookup_tables(model))
    head = model.config.vocab_size * model.config.d_model if model.config.tie_embeddings else 0
    return model.num_parameters() - lookups + head


def flops_per_token(model: DecoderLM, context: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 n_layers d_model context
    (attention scores and weighted values), as in the PaLM paper's appendix B."""
    config = model.config
    return 6 * matmul_parameters(model) + 12 * config.n_layers * config.d_model * context


class NonFiniteLoss(QkvError):
    pass


class Interrupted(QkvError):
    """Ctrl-C or SIGTERM stopped a run (after saving): exit status 128 + the signal's number
    (130, 143), as shells expect."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class StepInfo:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float


class BatchSource(Protocol):
    """Training batches: next() -> (inputs, targets); `generator` draws them (checkpoints save
    its state, so a resumed run draws the same)."""

    generator: torch.Generator

    def next(self) -> tuple[Inputs, Tensor]: ...


# (micro-batch size, micro-batches per step, world) -> this process's batch source
MakeBatches = Callable[[int, int, World], BatchSource]
# (model, autocast dtype, world) -> held-out scores
Evaluator = Callable[[nn.Module, torch.dtype, World], EvalResult]


@dataclass
class Trainer:
    """Runs `cfg.steps` optimizer steps of `model` on the batches `make_batches` gives, scoring
    it with `evaluator` every `cfg.eval_every` steps; `kind` names the command whose run it is
    (kept in trainer_state.json). Rank 0 writes checkpoints, metrics.jsonl and loss.png to
    `run_dir`.

    Progress goes to `on_step(StepInfo)`, `on_eval(step, EvalResult)` and `on_save(path)`.
    Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and raises
    KeyboardInterrupt.
    In a `world` of several processes (distributed.py) the model is wrapped by `strategy`, each
    process trains on its share of every global batch.
    """

    model: nn.Module
    tokenizer: Tokenizer
    cfg: TrainConfig
    run_dir: Path
    make_batches: MakeBatches
    evaluator: Evaluator
    kind: str = "train"
    on_step: Callable[[StepInfo], None] = lambda info: None
    on_eval: Callable[[int, EvalResult], None] = lambda step, result: None
    on_save: Callable[[Path], None] = lambda path: None
    history: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # LoRA: checkpoints hold only the adapter (its config)
    world: World = ONE_PROCESS
    strategy: str = "ddp"
    stop_grace: float = 30.0  # seconds a step may run on after Ctrl-C / SIGTERM
    row_tokens: int | None = None  # the longest row a batch holds (default: cfg.context)

    def __post_init__(self) -> None:
        self.cfg.validate()
        if self.cfg.context > self.model.config.max_seq_len:
            raise QkvError(
                f"--context {self.cfg.context} is longer than the model's max_seq_len "
                f"{self.model.config.max_seq_len}; lower --context or --set max_seq_len=..."
            )
        torch.set_flush_denormal(True)  # tiny Adam moments otherwise slow fp32 CPU math ~40x
        keep_freed_memory()  # activations reuse freed memory instead of page-faulting it back
        if self.world.size == 1:
            self.device = resolve_device(self.cfg.device)
        else:
            self.device = device_for(self.world, self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device, self.model.config.d_model)
        self.micro_batch, self.accum = split_batch(
            self.cfg.batch_size, self.cfg.grad_accum, self.world
        )
        rows = self.row_tokens or self.cfg.context
        check_fits(
            training_parts(
                self.model, self.micro_batch, rows, self.dtype,
                on_device=self.device.type == "cpu",
                shards=self.world.size if self.strategy == "fsdp" else 1,
                compiled=self.cfg.compile,
            ),
            f"a training step of {self.micro_batch} x {rows} tokens "
            f"(--batch-size {self.cfg.batch_size}, --context {self.cfg.context})",
            "lower --batch-size (--grad-accum N keeps the tokens per step) or --context",
            self.device,
        )  # fmt: skip
        self.model.to(self.device).train()
        self.wrapped = wrap(self.model, self.strategy, self.world, self.device)
        if self.cfg.optimizer == "muon" and self.strategy == "fsdp" and self.world.size > 1:
            raise QkvError(
                "--optimizer muon orthogonalises whole matrices, which FSDP shards: use "
                "--strategy ddp, or --optimizer adamw"
            )
        self.fused = self.device.type in ("cpu", "cuda")  # AdamW: one kernel for all parameters
        self.optimizer = build_optimizer(self.model, self.cfg, self.fused)
        self.forward = torch.compile(self.wrapped) if self.cfg.compile else self.wrapped
        self.batches = self.make_batches(self.micro_batch, self.accum, self.world)
        self.step = 0
        self.tokens_per_step = self.cfg.batch_size * self.cfg.context * self.cfg.grad_accum
        self.flops_per_step = flops_per_token(self.model, self.cfg.context) * self.tokens_per_step
        self._stop_requested = False
        self._grace: threading.Timer | None = None
        self.stop_signal = signal.SIGINT
        self._snapshot = self._rng_state()
        self.saved_step: int | None = None
        self.reached: tuple[int, float] | None = None  # (step, seconds): target_loss met
        self.started = time.perf_counter()

    def _rng_state(self) -> dict[str, Tensor]:
        return {
            "rng.torch": torch.get_rng_state(),
            "rng.batches": self.batches.generator.get_state(),
        }

    def _seed_other_ranks(self) -> None:
        """Dropout masks differ between processes: before each step rank r > 0 seeds its
        generator from (seed, step, r), so a resumed run draws the same; rank 0 keeps the run's
        generator, the one checkpoints hold."""
        if self.world.rank:
            torch.manual_seed(hash((self.cfg.seed, self.step, self.world.rank)) % 2**63)

    def save(self) -> Path:
        """A training checkpoint of this step (written by rank 0; every process takes part,
        as FSDP2's shards are gathered into whole tensors first)."""
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        if self.saved_step == self.step:  # e.g. Ctrl-C right after a scheduled save
            return path
        main = self.world.is_main

        def gathered(tensor: Tensor) -> Tensor | None:
            """One whole tensor at a time, kept (on the CPU) by rank 0 alone."""
            full = whole(tensor)
            return full.cpu() if main else None

        tensors = dict(self._snapshot)
        optimizer_state = self.optimizer.state_dict()
        for index, state in optimizer_state["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = gathered(torch.as_tensor(value))
        weights = None
        if self.adapter is None:
            weights = {name: gathered(value) for name, value in self.model.state_dict().items()}
        if not main:
            self.saved_step = self.step
            return path
        state = {
            "kind": self.kind,
            "step": self.step,
            "train_config": asdict(self.cfg),
            "param_groups": optimizer_state["param_groups"],
            "history": self.history,
        }
        path = save_training_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.tokenizer,
            tensors,
            state,
            self.cfg.keep_checkpoints,
            self.adapter,
            weights,
        )
        self.saved_step = self.step
        record(self.history, self.run_dir)
        self.on_save(path)
        return path

    def resume(self, folder: Path) -> None:
        """Restore model (or adapter), optimizer, RNG states and step from a training checkpoint."""
        if self.adapter is None:
            load_weights(self.model, folder / WEIGHTS)
        else:
            load_adapter_weights(self.model, folder / ADAPTER)
        tensors, state = load_training_state(folder)
        optimizer_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        groups = self.optimizer.param_groups
        names = [group["name"] for group in groups]
        params = [p for group in groups for p in group["params"]]
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                if int(index) < len(params):  # a misfit is reported by load_state_dict below
                    value = shard_as(value, params[int(index)])
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as err:
            raise QkvError(f"optimizer state in {folder} does not fit this model ({err})") from None
        for group, name in zip(self.optimizer.param_groups, names, strict=True):
            group["name"] = name  # hyper-parameters given now win over the saved ones
            group["peak_lr"] = self.cfg.muon_lr if name == "muon" else self.cfg.lr
            if name == "decay":
                group["weight_decay"] = self.cfg.weight_decay
            if "betas" in group:
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
        torch.set_rng_state(tensors["rng.torch"])
        self.batches.generator.set_state(tensors["rng.batches"])
        self.step = self.saved_step = state["step"]
        if self.cfg.steps <= self.step:
            raise QkvError(f"the run is already at step {self.step}; pass --steps larger than that")
        self.history = [h for h in state.get("history", []) if h["step"] <= self.step]
        self._snapshot = self._rng_state()

    def _request_stop(self, signum: int, frame: Any) -> None:
        """Stop after this step; a step still running `stop_grace` seconds later is abandoned
        (the process exits at once, the last checkpoint kept), as is one a second signal hits."""
        if self._stop_requested:
            return
        self._stop_requested = True
        self.stop_signal = signal.Signals(signum)
        self._grace = threading.Timer(self.stop_grace, self._abandon)
        self._grace.daemon = True
        self._grace.start()
        if self.world.size == 1:  # a second signal acts at once; under torchrun the terminal's
            immediate = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, immediate)  # Ctrl-C and torchrun's forwarded one both come

    def _step_ended(self) -> None:
        """The step running when a stop was asked for has ended: it is no longer abandoned
        (what follows, saving it, is not timed)."""
        if self._grace is not None:
            self._grace.cancel()

    def _abandon(self) -> None:
        kept = "none was saved" if self.saved_step is None else f"step {self.saved_step} is kept"
        print(
            f"qkv: what was running did not end within {self.stop_grace:g} s of "
            f"{self.stop_signal.name}; exiting now, without saving. The last checkpoint: {kept}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + self.stop_signal)

    def run(self) -> list[dict[str, Any]]:
        """Train to cfg.steps; returns the history (train and eval records). Ctrl-C (SIGINT)
        and SIGTERM (a scheduler's preemption, torchrun stopping) finish the step, save it and
        raise KeyboardInterrupt (`stop_signal` says which). Rank 0 holds the run directory's
        lock meanwhile: a second run into it is refused."""
        if not self.world.is_main:
            return self._run()
        with one_writer(self.run_dir):
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._request_stop)
        except ValueError:  # not the main thread: signal handling stays with the caller
            previous = {}
        try:
            self._loop()
        finally:
            self._step_ended()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.world.is_main:
                record(self.history, self.run_dir)
        return self.history

    def _loop(self) -> None:
        self.started = time.perf_counter()
        while self.step < self.cfg.steps and self.reached is None:
            if self.world.any(self._stop_requested):  # every process stops at the same step
                self._step_ended()
                self.save()
                raise KeyboardInterrupt
            step_start = time.perf_counter()
            self._seed_other_ranks()
            scale = lr_scale(self.step, self.cfg)
            lr = self.cfg.lr * scale
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * scale
            loss = self.world.mean(self._accumulate())
            grad_norm = float(
                whole(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                kept = (
                    "no checkpoint was saved yet"
                    if self.saved_step is None
                    else f"the last good checkpoint (step {self.saved_step}) is kept"
                )
                raise NonFiniteLoss(
                    f"the loss became {loss} (gradient norm {grad_norm}) at step {self.step + 1};"
                    f" training stopped and {kept}. Lower --lr, or raise --warmup-steps"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._step_ended()
            self.step += 1
            self._snapshot = self._rng_state()
            now = time.perf_counter()
            info = StepInfo(
                self.step, loss, lr, grad_norm, self.tokens_per_step / (now - step_start)
            )
            self.history.append(
                {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": info.grad_norm,
                    "tokens_per_second": info.tokens_per_second,
                }
            )
            self.on_step(info)
            last = self.step == self.cfg.steps
            if self.step % self.cfg.eval_every == 0 or last:
                result = self.evaluate()
                self.history.append(
                    {"step": self.step, **{f"val_{k}": v for k, v in result.to_dict().items()}}
                )
                if self.world.is_main:
                    record(self.history, self.run_dir)
                target = self.cfg.target_loss
                if target is not None and result.loss <= target:
                    self.reached = (self.step, time.perf_counter() - self.started)
                self.on_eval(self.step, result)
            if self.step % self.cfg.save_every == 0 or last or self.reached:
                self.save()

    def _accumulate(self) -> float:
        """Forward + backward over this process's micro-batches of the step; their mean loss.
        Gradients are averaged across processes in the last backward pass only."""
        total = 0.0
        for index in range(self.accum):
            x, y = self.batches.next()
            with gradient_sync(self.wrapped, index == self.accum - 1):
                total += self._forward_backward(self.forward, x, y)
        return total

    def _forward_backward(
        self, forward: Callable[..., Tensor], x: Tensor | tuple[Tensor, ...], y: Tensor
    ) -> float:
        """One micro-batch: loss / micro-batches per step, its gradients accumulated. `x` is the
        model's input, or a tuple of its inputs (an encoder-decoder's source, target and mask)."""
        inputs = tuple(t.to(self.device) for t in (x if isinstance(x, tuple) else (x,)))
        y = y.to(self.device)
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            logits = forward(*inputs)
        loss = next_token_loss(logits, y) / self.accum
        loss.backward()
        return loss.item()

    def seconds_per_step(self, repeats: int = 7, warmup: int = 3) -> float:
        """Median time of one optimizer step at this run's shapes, timed on a copy of the model
        with random tokens: the run's model, optimizer, batches and RNG are left as they were.
        Right after a tokenizer is trained the first steps run about 12% slow; 3 warmup steps
        and the median of 7 come within 5% of the run's own steps."""
        model = copy.deepcopy(self.model)
        optimizer = build_optimizer(model, self.cfg, self.fused)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        shape = (self.cfg.batch_size, self.cfg.context)
        times = []
        with torch.random.fork_rng(devices=[]):
            for _ in range(warmup + repeats):
                start = time.perf_counter()
                for _ in range(self.cfg.grad_accum):
                    x = torch.randint(0, model.config.vocab_size, shape)
                    self._forward_backward(model, x, x)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:])

    def evaluate(self) -> EvalResult:
        return self.evaluator(self.model, self.dtype, self.world)


def text_trainer(
    model: DecoderLM,
    tokenizer: Tokenizer,
    train_data: TokenFile,
    val_data: TokenFile,
    cfg: TrainConfig,
    run_dir: Path,
    **options: Any,
) -> Trainer:
    """A Trainer of a decoder on a corpus: random windows of `train_data`, scored on the first
    `cfg.eval_windows` windows of `val_data` (on all of it when given as `cfg.val_data`)."""

    def make_batches(micro_batch: int, accum: int, world: World) -> Batches:
        return Batches(train_data, micro_batch, cfg.context, cfg.seed, accum, world.rank,
                       world.size)  # fmt: skip

    def evaluator(model: nn.Module, dtype: torch.dtype, world: World) -> EvalResult:
        windows = None if cfg.val_data else cfg.eval_windows
        return evaluate(model, val_data, cfg.context, cfg.batch_size, windows, dtype, world=world)

    return Trainer(model, tokenizer, cfg, run_dir, make_batches, evaluator, **options)


@dataclass
class Run:
    """Everything a training run is made of, ready to `trainer.run()`."""

    trainer: Trainer
    corpus: Corpus
    resumed_from: Path | None

    def summary(self) -> str:
        """Three lines: the model, the data, the training (steps, tokens, FLOPs, device)."""
        trainer, corpus = self.trainer, self.corpus
        config, cfg = trainer.model.config, trainer.cfg
        tokens = cfg.steps * trainer.tokens_per_step
        return "\n".join(
            [
                f"model: {trainer.model.num_parameters():,} parameters; decoder "
                f"d_model={config.d_model}, heads={config.n_heads}, layers={config.n_layers}, "
                f"{config.position} positions, {config.norm}, {config.feed_forward}",
                f"data: {corpus.documents:,} documents; train {len(corpus.train.tokens):,} "
                f"tokens, validation {len(corpus.val.tokens):,} tokens; vocabulary "
                f"{corpus.tokenizer.vocab_size:,}, {corpus.train.bytes_per_token:.2f} bytes/token",
                f"training: {cfg.steps:,} steps x {trainer.tokens_per_step:,} tokens "
                f"({cfg.batch_size} x {cfg.context} x {cfg.grad_accum}) = {tokens:,} tokens "
                f"({tokens / max(1, len(corpus.train.tokens)):.1f} epochs); "
                f"{trainer.flops_per_step / 1e9:,.1f} GFLOP/step; {trainer.dtype} on "
                f"{trainer.device}"
                + _processes(trainer)
                + (f"; resuming at step {trainer.step}" if self.resumed_from else ""),
            ]
        )


def last_evaluation(trainer: Trainer) -> dict[str, Any]:
    """The last evaluation's record: val_loss, val_perplexity, val_bits_per_byte, ..."""
    return [h for h in trainer.history if "val_loss" in h][-1]


def _processes(trainer: Trainer) -> str:
    """How the global batch is split when torchrun started several processes."""
    world = trainer.world
    if world.size == 1:
        return ""
    return (
        f" x {world.size} processes ({trainer.strategy.upper()}, "
        f"{'NCCL' if trainer.device.type == 'cuda' else 'Gloo'}), each {trainer.accum} x "
        f"{trainer.micro_batch} sequences a step"
    )


def prepare_run(
    out: Path,
    cfg: TrainConfig,
    model_config: ModelConfig | None = None,
    resume: Path | None = None,
    progress: Callable[[str], None] | None = None,
    world: World = ONE_PROCESS,
    strategy: str = "ddp",
) -> Run:
    """Corpus + tokenizer + model + trainer for a new run in `out`, or one resumed from a
    checkpoint (whose model config and tokenizer are then used). A new model's context
    (max_seq_len) is the training context: learned positions past it would stay untrained.
    With several processes, the first on each machine tokenizes (and caches) the corpus first."""
    out = Path(out)
    cfg.validate()
    cfg.data = absolute_specs(cfg.data)
    cfg.val_data = absolute_specs(cfg.val_data) if cfg.val_data else None
    resolve_device(cfg.device)
    folder = None if resume is None else resolve(resume)
    check_run_directory(out, folder)
    tokenizer: Tokenizer | str = cfg.tokenizer
    if folder is not None:
        model_config = load_config(folder)
        tokenizer = Tokenizer.load(folder)
    with world.local_first():
        corpus = prepare_corpus(cfg.data, tokenizer, cfg.vocab_size, cfg.val_fraction, progress,
                                cfg.val_data)  # fmt: skip
    world.check_same(
        f"{corpus.tokenizer.backend.to_str()} {len(corpus.train.tokens)}", "the tokenized corpus"
    )
    if len(corpus.val.tokens) <= cfg.context:
        raise QkvError(
            f"the validation split has {len(corpus.val.tokens)} tokens, not enough for one "
            f"window of --context {cfg.context}; give more text, a smaller --context or a "
            "larger --val-fraction"
        )
    if model_config is None:
        model_config = ModelConfig.preset("tiny")
    if folder is None:
        model_config = model_config.replace(
            vocab_size=corpus.tokenizer.vocab_size,
            max_seq_len=cfg.context,
        )
    else:
        check_vocabulary(model_config.vocab_size, corpus.tokenizer, folder / CONFIG,
                         folder / TOKENIZER)  # fmt: skip
    torch.manual_seed(cfg.seed)
    source = "--preset / --set" if folder is None else str(folder)
    check_model_fits(model_config, source, resolve_device(cfg.device))
    model = build_model(model_config)
    if not isinstance(model, DecoderLM):
        raise QkvError(
            "qkv train trains decoder models; use a decoder preset or --set arch=decoder"
        )
    trainer = text_trainer(
        model, corpus.tokenizer, corpus.train, corpus.val, cfg, out, world=world,
        strategy=strategy,
    )  # fmt: skip
    if folder is not None:
        trainer.resume(folder)
    out.mkdir(parents=True, exist_ok=True)
    return Run(trainer, corpus, folder)


def run_to_end(trainer: Trainer, command: str = "train") -> None:
    """trainer.run(); a stop by Ctrl-C or SIGTERM (saved) is raised as Interrupted, saying how
    to continue (`qkv COMMAND --resume RUN`). Processes other than rank 0 stop silently."""
    try:
        trainer.run()
    except KeyboardInterrupt:
        if not trainer.world.is_main:
            return
        saved = (
            "no checkpoint saved"
            if trainer.saved_step is None
            else f"checkpoint at step {trainer.saved_step}"
        )
        how = "interrupted" if trainer.stop_signal == signal.SIGINT else "stopped by SIGTERM"
        raise Interrupted(
            f"{how} at step {trainer.step}; {saved}. Continue with: "
            f"qkv {command} --resume {trainer.run_dir}",
            trainer.stop_signal,
        ) from None


def train(
    out: Path | None = None,
    config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    resume: Path | None = None,
    *,
    world: World = ONE_PROCESS,
    strategy: str = "ddp",
    progress: Callable[[str], None] | None = None,
    on_start: Callable[[Run], None] | None = None,
    **options: Any,
) -> Run:
    """`qkv train` of a decoder into the run directory `out` (default runs/train): `options`
    (TrainConfig fields) over `config`, or over the run's own settings when resuming (into its
    own run directory unless `out` says otherwise). The run is reported to `on_start` (rank 0),
    where a caller may set the trainer's on_step / on_eval / on_save; then it trains to
    cfg.steps and is returned. Under torchrun every process calls this; the global batch is
    split over them."""
    if resume is not None:
        if model_config is not None:
            raise QkvError("a resumed run keeps its own model: drop the model config")
        if {"tokenizer", "vocab_size"} & set(options):
            raise QkvError("a resumed run keeps its own tokenizer: drop --tokenizer/--vocab-size")
        state = read_run(resume)
        state.require("train")
        config, out = state.train_config, out or state.run_dir
    cfg = dataclasses.replace(config or TrainConfig(), **options)
    out = Path(out or "runs/train")
    split_batch(cfg.batch_size, cfg.grad_accum, world)  # before connecting: it may not divide
    writing = one_writer(out) if world.is_main else contextlib.nullcontext()
    with writing, distributed.joined(world, cfg.device, out / LATEST):
        run = prepare_run(
            out, cfg, model_config, resume, progress if world.is_main else None, world, strategy
        )
        if world.is_main and on_start:
            on_start(run)
        run_to_end(run.trainer)
    return run
