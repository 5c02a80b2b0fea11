"""The training loop: AdamW with weight-decay groups, warmup + cosine schedule, gradient clipping,
accumulation, bf16 autocast, periodic evaluation and atomic checkpoints, resumable exactly.

loss = cross-entropy of next-token logits; perplexity = exp(loss);
bits per byte = loss * tokens / (bytes * ln 2), comparable across tokenizers.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.checkpoint import (
    ADAPTER,
    LATEST,
    WEIGHTS,
    load_adapter_weights,
    load_config,
    load_training_state,
    load_weights,
    resolve,
    run_directory,
    save_training_checkpoint,
)
from qkv.config import ModelConfig
from qkv.data import Batches, Corpus, TokenFile, eval_windows, prepare_corpus
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
from qkv.model import DecoderLM, build_model
from qkv.nn.embedding import TokenEmbedding
from qkv.nn.position import LearnedPositionalEmbedding
from qkv.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """Everything a run needs besides the model config. It is saved in every checkpoint, so
    `--resume` continues the same run; most fields are `qkv train` options."""

    data: list[str] = field(default_factory=lambda: ["builtin:stdlib-docs"])
    val_fraction: float = 0.05
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    context: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_windows: int = 256
    save_every: int = 500
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    keep_checkpoints: int = 2

    def validate(self) -> None:
        positive = ("steps", "batch_size", "context", "grad_accum", "eval_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise QkvError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.lr < math.inf:
            raise QkvError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 < self.grad_clip < math.inf:
            raise QkvError(f"--grad-clip must be positive and finite, got {self.grad_clip}")
        if not 0 <= self.weight_decay < math.inf:
            raise QkvError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise QkvError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise QkvError("--warmup-steps must be 0 or more")
        if not 0 < self.val_fraction < 1:
            raise QkvError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise QkvError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise QkvError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QkvError(f"--device {name} was asked for but no CUDA GPU is available; use cpu")
    return device


def resolve_dtype(name: str, device: torch.device, d_model: int) -> torch.dtype:
    """auto -> bfloat16 where it pays: CUDA with bf16, or a CPU with native bf16 matmul and
    d_model >= 256 (measured: bf16 is 1.45x faster at d_model 256, 0.8x at d_model 128)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native and d_model >= 256 else torch.float32


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps (at most a tenth of `steps`), then cosine decay to
    lr * min_lr_ratio at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _lookup_tables(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables: token embeddings and learned positions (lookups, not matmuls)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, (TokenEmbedding, LearnedPositionalEmbedding))
        for p in m.parameters(recurse=False)
    ]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; no decay on norms, biases and embedding tables."""
    no_decay_ids = {id(p) for p in _lookup_tables(model)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def matmul_parameters(model: DecoderLM) -> int:
    """Parameters that take part in a matmul: all but lookup tables, plus the head's matrix."""
    lookups = sum(p.numel() for p in _lookup_tables(model))
    head = model.config.vocab_size * model.config.d_model if model.config.tie_embeddings else 0
    return model.num_parameters() - lookups + head


def flops_per_token(model: DecoderLM, context: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 n_layers d_model context
    (attention scores and weighted values), as in the PaLM paper's appendix B."""
    config = model.config
    return 6 * matmul_parameters(model) + 12 * config.n_layers * config.d_model * context


def next_token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy -log p(target) over (batch, seq), computed in float32."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int

    def to_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
        }


@torch.no_grad()
def evaluate(
    model: DecoderLM,
    data: TokenFile,
    context: int,
    batch_size: int = 16,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    world: World = ONE_PROCESS,
) -> EvalResult:
    """Mean next-token loss over consecutive windows of `data` (from its start). With several
    processes, process r scores batches r, r + N, r + 2N, ... and the sums are added up; one
    left without a batch in the last round runs a batch again unscored, as FSDP needs every
    process in every forward pass."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, tokens

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x.to(device))

    index, scored = -1, 0
    for index, (x, y) in enumerate(eval_windows(data, context, batch_size, max_windows)):
        if progress:
            progress(y.shape[0])
        if index % world.size == world.rank:
            sums[0] += next_token_loss(forward(x), y.to(device), reduction="sum").item()
            sums[1] += y.numel()
            scored += 1
    for _ in range(scored, math.ceil((index + 1) / world.size)):
        forward(x)
    model.train(was_training)
    total, count = world.total(sums).tolist()
    count = int(count)
    loss = total / count
    return EvalResult(
        loss, math.exp(min(loss, 80.0)), loss / (math.log(2) * data.bytes_per_token), count
    )


class NonFiniteLoss(QkvError):
    pass


@dataclass
class StepInfo:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float


@dataclass
class Trainer:
    """Runs `cfg.steps` optimizer steps of `model` on `train_data`, evaluating on `val_data`.

    Progress goes to `on_step(StepInfo)`, `on_eval(step, EvalResult)` and `on_save(path)`.
    Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and raises
    KeyboardInterrupt.
    In a `world` of several processes (distributed.py) the model is wrapped by `strategy`, each
    process trains on its share of every global batch, and only rank 0 writes checkpoints.
    """

    model: DecoderLM
    tokenizer: Tokenizer
    train_data: TokenFile
    val_data: TokenFile
    cfg: TrainConfig
    run_dir: Path
    on_step: Callable[[StepInfo], None] = lambda info: None
    on_eval: Callable[[int, EvalResult], None] = lambda step, result: None
    on_save: Callable[[Path], None] = lambda path: None
    history: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Any] | None = None  # LoRA: checkpoints hold only the adapter (its config)
    world: World = ONE_PROCESS
    strategy: str = "ddp"
    kind: ClassVar[str] = "train"  # which command's run this is, kept in trainer_state.json

    def __post_init__(self) -> None:
        self.cfg.validate()
        if self.cfg.context > self.model.config.max_seq_len:
            raise QkvError(
                f"--context {self.cfg.context} is longer than the model's max_seq_len "
                f"{self.model.config.max_seq_len}; lower --context or --set max_seq_len=..."
            )
        torch.set_flush_denormal(True)  # tiny Adam moments otherwise slow fp32 CPU math ~40x
        if self.world.size == 1:
            self.device = resolve_device(self.cfg.device)
        else:
            self.device = device_for(self.world, self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device, self.model.config.d_model)
        self.model.to(self.device).train()
        self.wrapped = wrap(self.model, self.strategy, self.world, self.device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.cfg.weight_decay),
            lr=self.cfg.lr,
            betas=(self.cfg.beta1, self.cfg.beta2),
            fused=self.device.type in ("cpu", "cuda"),  # one kernel for all parameters
        )
        self.forward = torch.compile(self.wrapped) if self.cfg.compile else self.wrapped
        self.micro_batch, self.accum = split_batch(
            self.cfg.batch_size, self.cfg.grad_accum, self.world
        )
        self.batches = self.make_batches()
        self.step = 0
        self.tokens_per_step = self.cfg.batch_size * self.cfg.context * self.cfg.grad_accum
        self.flops_per_step = flops_per_token(self.model, self.cfg.context) * self.tokens_per_step
        self._stop_requested = False
        self.stop_signal = signal.SIGINT
        self._snapshot = self._rng_state()
        self.saved_step: int | None = None

    def make_batches(self) -> Batches:
        """The training batch source: next() -> (inputs, targets); its `generator` is saved."""
        return Batches(
            self.train_data,
            self.micro_batch,
            self.cfg.context,
            self.cfg.seed,
            self.accum,
            self.world.rank,
            self.world.size,
        )

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
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
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
        decay, no_decay = self.optimizer.param_groups  # hyper-parameters given now win
        decay["weight_decay"] = self.cfg.weight_decay
        for group in (decay, no_decay):
            group["betas"] = (self.cfg.beta1, self.cfg.beta2)
        torch.set_rng_state(tensors["rng.torch"])
        self.batches.generator.set_state(tensors["rng.batches"])
        self.step = self.saved_step = state["step"]
        if self.cfg.steps <= self.step:
            raise QkvError(f"the run is already at step {self.step}; pass --steps larger than that")
        self.history = [h for h in state.get("history", []) if h["step"] <= self.step]
        self._snapshot = self._rng_state()

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        self.stop_signal = signal.Signals(signum)
        if self.world.size == 1:  # a second signal acts at once; under torchrun the terminal's
            immediate = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, immediate)  # Ctrl-C and torchrun's forwarded one both come

    def run(self) -> list[dict[str, Any]]:
        """Train to cfg.steps; returns the history (train and eval records). Ctrl-C (SIGINT)
        and SIGTERM (a scheduler's preemption, torchrun stopping) finish the step, save it and
        raise KeyboardInterrupt (`stop_signal` says which)."""
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
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.history

    def _loop(self) -> None:
        while self.step < self.cfg.steps:
            if self.world.any(self._stop_requested):  # every process stops at the same step
                self.save()
                raise KeyboardInterrupt
            step_start = time.perf_counter()
            self._seed_other_ranks()
            lr = lr_at(self.step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
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
                self.on_eval(self.step, result)
            if self.step % self.cfg.save_every == 0 or last:
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

    def seconds_per_step(self, repeats: int = 3, warmup: int = 2) -> float:
        """Median time of one optimizer step at this run's shapes, timed on a copy of the model
        with random tokens: the run's model, optimizer, batches and RNG are left as they were."""
        model = copy.deepcopy(self.model)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=0.0, fused=self.optimizer.defaults["fused"]
        )
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
        return evaluate(
            self.model,
            self.val_data,
            self.cfg.context,
            self.cfg.batch_size,
            self.cfg.eval_windows,
            self.dtype,
            world=self.world,
        )


def write_metrics(history: Iterable[dict[str, Any]], path: Path) -> None:
    """One JSON object per line: training steps and evaluations."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history), encoding="utf-8")
    tmp.replace(path)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@dataclass
class Run:
    """Everything a training run is made of, ready to `trainer.run()`."""

    trainer: Trainer
    corpus: Corpus
    resumed_from: Path | None


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
    cfg.validate()
    resolve_device(cfg.device)
    if out.exists() and not out.is_dir():
        raise QkvError(f"--out {out} is a file; give a directory for the run")
    folder = None
    if resume is not None:
        folder = resolve(resume)
        model_config = load_config(folder)
        tokenizer: Tokenizer | str = Tokenizer.load(folder)
        if (out / LATEST).exists() and run_directory(folder).resolve() != out.resolve():
            raise QkvError(
                f"{out} holds another training run; resume into the checkpoint's own run "
                f"({run_directory(folder)}) or give an --out without one"
            )
    else:
        if (out / LATEST).exists():
            raise QkvError(
                f"{out} already holds a training run; pass --resume {out} to continue it, "
                "or choose another --out"
            )
        tokenizer = cfg.tokenizer
    with world.local_first():
        corpus = prepare_corpus(cfg.data, tokenizer, cfg.vocab_size, cfg.val_fraction, progress)
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
    if resume is None:
        model_config = model_config.replace(
            vocab_size=corpus.tokenizer.vocab_size,
            max_seq_len=cfg.context,
        )
    elif model_config.vocab_size != corpus.tokenizer.vocab_size:
        raise QkvError(f"checkpoint {folder} has a tokenizer that does not fit its model")
    torch.manual_seed(cfg.seed)
    model = build_model(model_config)
    if not isinstance(model, DecoderLM):
        raise QkvError(
            "qkv train trains decoder models; use a decoder preset or --set arch=decoder"
        )
    trainer = Trainer(
        model, corpus.tokenizer, corpus.train, corpus.val, cfg, out, world=world, strategy=strategy
    )
    if folder is not None:
        trainer.resume(folder)
    out.mkdir(parents=True, exist_ok=True)
    return Run(trainer, corpus, folder)
