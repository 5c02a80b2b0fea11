"""Fine-tuning data: prompt/response pairs and chats as token ids, with the loss on responses only.

The chat template (qkv.chat_template) wraps each turn in special tokens added to the tokenizer,
the text between them encoded as plain text (a special token spelled in it is just characters):
    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|> ...
loss = sum_t mask_t * -log p(x_{t+1} | x_<=t) / sum_t mask_t, where mask_t = 1 exactly when
x_{t+1} belongs to an assistant's reply or the <|endoftext|> that closes it: the model learns to
answer, not to predict the prompts it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv.chat_template import ROLES, add_chat_tokens, answer_prompt, encode_turns, grow_vocabulary
from qkv.checkpoint import (
    ADAPTER,
    ADAPTER_CONFIG,
    WEIGHTS,
    check_run_directory,
    load_adapter_model,
    load_model,
    read_adapter_config,
    read_run,
    resolve,
    weights_digest,
    write_checkpoint,
)
from qkv.config import FINETUNE, FINETUNE_LR, LORA_LR, TrainConfig
from qkv.data import absolute_specs, held_out_indices, stdlib_docs
from qkv.distributed import World
from qkv.errors import QkvError
from qkv.evaluation import IGNORE, EvalResult, score
from qkv.files import check_new_directory, one_writer
from qkv.generate import Generator
from qkv.model import DecoderLM
from qkv.nn.lora import DEFAULT_TARGETS, UnknownTargets, add_lora, merge_lora
from qkv.text import model_file, read_jsonl
from qkv.tokenizer import Tokenizer
from qkv.train import Trainer, run_to_end

# What a resumed run may change; the rest comes from its checkpoint.
OPTIONS = ("steps", "batch_size", "context", "lr", "eval_every", "save_every", "seed", "device")


@dataclass(frozen=True)
class Example:
    """One conversation: (role, text) turns; a prompt/response pair is a user and an assistant."""

    turns: tuple[tuple[str, str], ...]


def parse_example(record: object) -> Example:
    """{"prompt", "response"} or {"messages": [{"role", "content"}, ...]} -> Example."""
    if isinstance(record, dict) and {"prompt", "response"} <= record.keys():
        prompt, response = record["prompt"], record["response"]
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise ValueError('"prompt" and "response" must be strings')
        return Example((("user", prompt), ("assistant", response)))
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        turns = []
        for message in record["messages"]:
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(
                    'each message needs a "role" (system, user or assistant) and a "content" string'
                )
            turns.append((role, message["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise ValueError("the messages have no assistant reply to learn from")
        return Example(tuple(turns))
    raise ValueError('expected {"prompt": ..., "response": ...} or {"messages": [...]}')


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSON Lines file; a malformed line is an error naming the file and line."""
    examples = []
    for number, record in read_jsonl(path):
        try:
            examples.append(parse_example(record))
        except ValueError as err:
            raise QkvError(f"{path}, line {number}: {err}") from None
    if not examples:
        raise QkvError(f"{path} holds no examples")
    return examples


def stdlib_qa(
    val_fraction: float = 0.05, progress: Callable[[str], None] | None = None
) -> tuple[list[Example], list[Example]]:
    """builtin:stdlib-qa: "What does json.dumps do?" answered by the first paragraph of its
    docstring, for the standard library's documented modules, classes and functions (from
    builtin:stdlib-docs). Split by top-level package: the validation split holds every question
    about the val_fraction of packages whose names hash lowest, so none of them is trained on."""
    pairs = []
    for document in stdlib_docs(progress):
        answer = " ".join(re.split(r"\n\s*\n", document.text.strip())[0].split())
        if len(answer) >= 20:
            pairs.append((document.source, answer))
    packages = sorted({source.split(".")[0] for source, _ in pairs})
    keys = [hashlib.sha256(name.encode()).hexdigest() for name in packages]
    held_out = {packages[i] for i in held_out_indices(keys, val_fraction)}
    train: list[Example] = []
    val: list[Example] = []
    for source, answer in pairs:
        example = Example((("user", f"What does {source} do?"), ("assistant", answer)))
        (val if source.split(".")[0] in held_out else train).append(example)
    return train, val


def encode_example(example: Example, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation (chat_template.render's) and, per position t,
    whether token t is a target of the loss (part of an assistant reply or its closing
    <|endoftext|>: every token of an assistant turn but its role token)."""
    ids: list[int] = []
    target: list[int] = []
    turns = list(example.turns)
    for (role, _), turn in zip(turns, encode_turns(turns, tokenizer), strict=True):
        ids += turn
        target += [0] + [int(role == "assistant")] * (len(turn) - 1)
    return ids, target


@dataclass
class EncodedExamples:
    """Examples as (token ids, target flags) that fit the context, the bytes of their targets'
    text (for bits per byte), and how many longer ones were left out."""

    rows: list[tuple[list[int], list[int]]]
    target_bytes: int
    skipped: int


def prepare_examples(
    examples: list[Example], tokenizer: Tokenizer, context: int
) -> EncodedExamples:
    """Encode with the chat template; an example longer than context + 1 tokens is skipped."""
    rows, target_bytes, skipped = [], 0, 0
    for example in examples:
        ids, target = encode_example(example, tokenizer)
        if len(ids) > context + 1:
            skipped += 1
            continue
        rows.append((ids, target))
        targets = [i for i, t in zip(ids, target, strict=True) if t]
        target_bytes += len(tokenizer.decode(targets).encode("utf-8"))
    return EncodedExamples(rows, target_bytes, skipped)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs (batch, longest - 1), right-padded (causal attention never looks right, so pads
    need no mask), and targets: the next token where it is a target, else IGNORE."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        ids_t, target_t = torch.tensor(ids), torch.tensor(target, dtype=torch.bool)
        x[i, : len(ids) - 1] = ids_t[:-1]
        y[i, : len(ids) - 1] = torch.where(target_t[1:], ids_t[1:], IGNORE)
    return x, y


class ExampleBatches:
    """Random batches of examples (drawn with `generator`, so a resumed run draws the same)."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int) -> None:  # fmt: skip
        if not rows:
            raise QkvError("no fine-tuning example fits the context; raise --context")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        picks = torch.randint(0, len(self.rows), (self.batch_size,), generator=self.generator)
        return collate([self.rows[i] for i in picks.tolist()], self.pad_id)


def evaluate_responses(
    model: nn.Module,
    data: EncodedExamples,
    pad_id: int,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """Scores over every response token of `data`, in order."""
    batches = (
        collate(data.rows[first : first + batch_size], pad_id)
        for first in range(0, len(data.rows), batch_size)
    )
    return score(model, batches, data.target_bytes, dtype)


def finetune_trainer(
    model: DecoderLM,
    tokenizer: Tokenizer,
    train: EncodedExamples,
    val: EncodedExamples,
    cfg: TrainConfig,
    run_dir: Path,
    **options: Any,
) -> Trainer:
    """A Trainer on prompt/response examples: batches of whole examples drawn at random, loss
    and evaluation on the response tokens only."""

    def make_batches(micro_batch: int, accum: int, world: World) -> ExampleBatches:
        return ExampleBatches(train.rows, cfg.batch_size, tokenizer.pad_id, cfg.seed)

    def evaluator(model: nn.Module, dtype: torch.dtype, world: World) -> EvalResult:
        return evaluate_responses(model, val, tokenizer.pad_id, dtype=dtype)

    longest = max((len(ids) for ids, _ in train.rows), default=cfg.context)
    return Trainer(
        model, tokenizer, cfg, run_dir, make_batches, evaluator, kind="finetune",
        row_tokens=longest, **options,
    )  # fmt: skip


def load_examples(
    spec: str, val_fraction: float = 0.05, progress: Callable[[str], None] | None = None
) -> tuple[list[Example], list[Example]]:
    """builtin:stdlib-qa, or a JSONL file split by example: validation = the val_fraction of
    examples whose text hashes lowest (at least one), the same on every run."""
    if spec == "builtin:stdlib-qa":
        return stdlib_qa(val_fraction, progress)
    if spec.startswith("builtin:"):
        raise QkvError(f"unknown builtin data {spec!r}; available: builtin:stdlib-qa")
    examples = read_examples(spec)
    if len(examples) < 2:
        raise QkvError(f"{spec} holds one example; a validation split needs at least two")
    keys = [hashlib.sha256(repr(e.turns).encode()).hexdigest() + str(i)
            for i, e in enumerate(examples)]  # fmt: skip
    held_out = held_out_indices(keys, val_fraction)
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


@dataclass(frozen=True)
class LoRASettings:
    """What `qkv finetune --lora-rank` adapts: rank r, alpha (scale alpha / r; default 2 r),
    dropout on the adapter's input, and the linear layers by name (q_proj, k_proj, v_proj,
    o_proj, w1, w2, gate, up, down; default q_proj, v_proj)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)
        if self.rank < 1:
            raise QkvError(f"--lora-rank must be at least 1; got {self.rank}")
        if not self.alpha > 0:
            raise QkvError(f"--lora-alpha must be positive; got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise QkvError(f"--lora-dropout must be in [0, 1); got {self.dropout}")
        if not self.targets:
            raise QkvError("--lora-targets names no layer; e.g. q_proj,v_proj")


def prepare_finetune(
    model_dir: str | Path | None,
    spec: str,
    cfg: TrainConfig,
    out: Path,
    progress: Callable[[str], None] | None = None,
    lora: LoRASettings | None = None,
    resume: Path | None = None,
) -> FinetuneRun:
    """A trainer that fine-tunes the decoder in `model_dir` on `spec` (the chat tokens added to
    its tokenizer and embedding, examples longer than the context skipped), fully or through a
    LoRA adapter, or one that continues the fine-tuning run checkpointed at `resume`."""
    adapter = None
    if resume is not None:
        folder = resolve(resume)
        if model_file(folder, ADAPTER_CONFIG):
            adapter = read_adapter_config(folder)
            model, tokenizer = load_adapter_model(folder)
        else:
            model, tokenizer = load_model(folder)
    else:
        check_run_directory(out)
        base = resolve(model_dir)
        if lora is not None and not model_file(base, WEIGHTS):
            raise QkvError(f"{base} is itself a LoRA adapter: merge it first (qkv merge)")
        model, tokenizer = load_model(base, "cpu")
        if lora is None and merge_lora(model):  # an adapter: fine-tune its merged weights
            model.requires_grad_(True)
        if lora is not None:
            adapter = {
                "base": str(base.resolve()),
                "base_sha256": weights_digest(base),
                **asdict(lora),
            }
    if not isinstance(model, DecoderLM):
        raise QkvError(
            f"{model_dir} holds an {model.config.arch} model; fine-tuning needs a decoder"
        )
    add_chat_tokens(tokenizer)
    grow_vocabulary(model, tokenizer)
    if lora is not None and resume is None:
        try:
            add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
        except UnknownTargets as err:
            raise QkvError(
                f"--lora-targets names {', '.join(err.unknown)}, which this model does not have; "
                f"its linear layers are: {', '.join(err.names)}"
            ) from None
        except ValueError as err:  # a rank too large
            raise QkvError(f"LoRA: {err}") from None
    cfg.context = min(cfg.context, model.config.max_seq_len)
    train, val = load_examples(spec, cfg.val_fraction, progress)
    train_data = prepare_examples(train, tokenizer, cfg.context)
    val_data = prepare_examples(val, tokenizer, cfg.context)
    if not val_data.rows:
        raise QkvError("no validation example fits the context; raise --context or add data")
    torch.manual_seed(cfg.seed)
    trainer = finetune_trainer(model, tokenizer, train_data, val_data, cfg, out, adapter=adapter)
    if resume is not None:
        trainer.resume(folder)
    out.mkdir(parents=True, exist_ok=True)
    return FinetuneRun(trainer, train_data, val_data, val, resume is not None)


@dataclass
class FinetuneRun:
    """A fine-tuning run: its trainer, the examples that fit the context, the held-out ones."""

    trainer: Trainer
    train_examples: EncodedExamples
    val_examples: EncodedExamples
    held_out: list[Example]
    resumed: bool
    before: EvalResult | None = None  # held-out scores before this session's steps

    def summary(self) -> str:
        """The data, the parameters trained and, with LoRA, the adapter."""
        trainer, cfg = self.trainer, self.trainer.cfg
        train, val = self.train_examples, self.val_examples
        model = trainer.model
        lines = [
            f"data: {len(train.rows):,} training and {len(val.rows):,} validation examples"
            f" ({train.skipped + val.skipped:,} longer than the context of {cfg.context} tokens"
            f" skipped); {model.num_parameters():,} parameters, {self.trained_parameters:,} "
            f"trained; {cfg.steps:,} steps x {cfg.batch_size} examples"
            + (f"; resuming at step {trainer.step}" if self.resumed else "")
        ]
        if trainer.adapter is not None:
            a = trainer.adapter
            lines.append(
                f"LoRA: rank {a['rank']}, alpha {a['alpha']:g}, dropout {a['dropout']:g} on "
                f"{', '.join(a['targets'])}; base model {a['base']} stays frozen"
            )
        return "\n".join(lines)

    @property
    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)

    @property
    def adapter_file(self) -> Path | None:
        """RUN/latest/adapter.safetensors of a LoRA run."""
        adapter = self.trainer.run_dir / "latest" / ADAPTER
        return adapter if self.trainer.adapter is not None else None

    def sample_answers(self, count: int = 3, max_new_tokens: int = 48) -> list[tuple[str, str]]:
        """(question, greedy answer) for the first held-out questions."""
        trainer = self.trainer
        generator = Generator(trainer.model.eval(), trainer.tokenizer)
        questions = [e.turns[-2][1] for e in self.held_out
                     if len(e.turns) > 1 and e.turns[-2][0] == "user"]  # fmt: skip
        answers = []
        for question in questions[:count]:
            prompt = answer_prompt([("user", question)], trainer.tokenizer)
            answer = generator.generate(prompt, max_new_tokens=max_new_tokens, temperature=0)
            answers.append((question, answer.text.strip()))
        return answers


def finetune(
    model_dir: str | Path | None = None,
    data: str | None = None,
    out: Path | None = None,
    *,
    lora: LoRASettings | None = None,
    resume: Path | None = None,
    progress: Callable[[str], None] | None = None,
    on_start: Callable[[FinetuneRun], None] | None = None,
    **options: Any,
) -> FinetuneRun:
    """`qkv finetune`: fine-tune the decoder in `model_dir` on `data` (a JSONL file; default
    builtin:stdlib-qa) into the run directory `out`, or continue the run at `resume`. `options`
    are TrainConfig fields (OPTIONS); a new run's defaults are config.FINETUNE, lr FINETUNE_LR
    (LORA_LR with `lora`), the model's context, warmup a tenth of the steps (at most 100).
    Reports the run to `on_start` once its held-out scores before training are known (where a
    caller may set the trainer's on_step / on_eval / on_save), then trains."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QkvError(f"fine-tuning has no option {unknown[0]}; it takes {', '.join(OPTIONS)}")
    if resume is not None:
        if model_dir or data or lora:
            raise QkvError(
                "--resume continues a run with its own model and data: drop "
                "--model/--data/--lora-rank"
            )
        state = read_run(resume)
        state.require("finetune")
        base, out = state.train_config, out or state.run_dir
    else:
        if model_dir is None or out is None:
            raise QkvError("give --model (the checkpoint to start from) and --out, or --resume RUN")
        specs = absolute_specs([data or "builtin:stdlib-qa"])
        lr = LORA_LR if lora else FINETUNE_LR
        base = TrainConfig(data=specs, context=10**9, lr=lr, **FINETUNE)
    cfg = dataclasses.replace(base, **options)
    if resume is None:
        cfg.warmup_steps = min(100, cfg.steps // 10)
    with one_writer(Path(out)):
        run = prepare_finetune(model_dir, cfg.data[0], cfg, Path(out), progress, lora, resume)
        run.before = run.trainer.evaluate()
        if on_start:
            on_start(run)
        run_to_end(run.trainer, "finetune")
    return run


@dataclass
class MergeReport:
    layers: int
    parameters: int
    difference: float  # max |logits of merged - logits of base + adapter| on a random probe


def merge_adapter(adapter_dir: str | Path, out: Path) -> MergeReport:
    """`qkv merge`: fold a LoRA adapter into its base model (W' = W + (alpha / r) B A) and write
    the plain checkpoint to `out`, checked on a random probe of token ids."""
    folder = resolve(adapter_dir)
    if not model_file(folder, ADAPTER_CONFIG):
        raise QkvError(
            f"{folder} is not a LoRA adapter (it has no {ADAPTER_CONFIG}): nothing to merge"
        )
    check_new_directory(out)
    model, tokenizer = load_model(folder)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(
        0, model.config.vocab_size, (2, min(16, model.config.max_seq_len)), generator=generator
    )
    with torch.no_grad():
        before = model(probe)
        layers = merge_lora(model)
        difference = float((model(probe) - before).abs().max())
    write_checkpoint(out, model, tokenizer)
    return MergeReport(layers, model.num_parameters(), difference)
