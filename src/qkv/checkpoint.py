"""Checkpoint directories, written atomically and read back safely (no pickle).

A checkpoint is a directory: `config.json` (ModelConfig), `model.safetensors`, `tokenizer.json`,
and for training `optimizer.safetensors` (optimizer moments and RNG states) with
`trainer_state.json` (step, hyper-parameters, optimizer groups). A LoRA checkpoint holds only the
adapter: `adapter_config.json` (the base checkpoint, its weights' SHA-256, rank, alpha, targets)
and `adapter.safetensors` in place of `config.json` and `model.safetensors`. A training run keeps
them in RUN/checkpoints/step-NNNNNNNN and points the symlink RUN/latest at the newest. Each is
written in a hidden temporary directory and renamed into place, then `latest` is swapped
atomically, so a crash or SIGKILL at any moment leaves the previous checkpoint whole and `latest`
pointing at it; a write that fails (a full or read-only disk) is one QkvError saying so, with
nothing temporary left behind. Where `latest` is missing or points at nothing, a run's newest
complete checkpoint is used, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qkv import files, hf
from qkv.chat_template import grow_vocabulary
from qkv.config import STRINGS, TEXT, Kind, ModelConfig, TrainConfig, check_fields, integer, number
from qkv.device import choose_load_dtype
from qkv.distributed import shard_as
from qkv.errors import ConfigError, QkvError
from qkv.memory import MORE_MEMORY, check_model_fits
from qkv.model import build_model
from qkv.nn.lora import add_lora, lora_state_dict
from qkv.text import model_file, read_model_json
from qkv.tokenizer import Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "adapter.safetensors"
ADAPTER_FIELDS: dict[str, Kind] = {
    "base": TEXT, "base_sha256": TEXT, "rank": integer(1), "alpha": number(0),
    "dropout": Kind("a number from 0 to below 1", lambda v: number(-1).accepts(v) and 0 <= v < 1),
    "targets": STRINGS,
}  # fmt: skip
LATEST = "latest"
STEP = re.compile(r"step-(\d+)")  # RUN/checkpoints/step-NNNNNNNN
# Each kind of run (trainer_state.json's "kind"): what it is, and what continues it.
KINDS = {
    "train": ("a training run", "qkv train --resume (train.train)"),
    "seq2seq": ("an encoder-decoder run", "qkv train --resume (seq2seq.train_seq2seq)"),
    "finetune": ("a fine-tuning run", "qkv finetune --resume (finetune.finetune)"),
}


def write_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tensors: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory at `folder` atomically (temp dir + rename); returns it.
    With `adapter` (its adapter_config.json), only the model's LoRA tensors are written;
    otherwise `weights` (default: the model's state dict)."""
    with files.atomic_directory(folder, "checkpoint") as tmp:
        _write_checkpoint_files(tmp, model, tokenizer, tensors, state, adapter, weights)
    return folder


def _write_checkpoint_files(
    tmp: Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tensors: dict[str, torch.Tensor] | None,
    state: dict[str, Any] | None,
    adapter: dict[str, Any] | None,
    weights: dict[str, torch.Tensor] | None,
) -> None:
    if adapter is None:
        (tmp / CONFIG).write_text(model.config.to_json(), encoding="utf-8")
        weights = weights if weights is not None else model.state_dict()
        weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
    else:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2), encoding="utf-8")
        weights = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
        save_file(weights, tmp / ADAPTER, metadata={"format": "pt"})
    tokenizer.save(tmp / TOKENIZER)
    if tensors is not None:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / OPTIMIZER)
    if state is not None:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
    adapter: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """RUN/checkpoints/step-NNNNNNNN, then RUN/latest -> it; older ones beyond `keep` removed.
    A write that fails is a QkvError naming the checkpoint and the previous one, left whole."""
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    if folder.parent.is_dir():  # temporary folders a killed process left behind
        for stale in folder.parent.iterdir():
            if stale.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(stale, ignore_errors=True)
    link = run_dir / LATEST
    linked = link.is_symlink() and link.exists()
    previous = run_dir / os.readlink(link) if linked else newest_checkpoint(run_dir)
    kept = (
        f"; the previous checkpoint {previous} is untouched"
        if previous
        else "; no earlier checkpoint was saved"
    )
    with files.atomic_directory(folder, "checkpoint", kept) as tmp:
        _write_checkpoint_files(tmp, model, tokenizer, tensors, state, adapter, weights)
    tmp_link = run_dir / f".{LATEST}-{os.getpid()}"
    try:
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(folder.relative_to(run_dir))
        os.replace(tmp_link, link)
        files.fsync(run_dir)
    except OSError as err:
        tmp_link.unlink(missing_ok=True)
        whole = f"; the checkpoint itself is whole: resume from it with --resume {folder}"
        raise files.write_error(f"the link {link} to {folder}", err, whole) from None
    checkpoints = sorted(p for p in folder.parent.iterdir() if p.name.startswith("step-"))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def run_directory(checkpoint: Path) -> Path:
    """The training run a checkpoint belongs to (RUN for RUN/checkpoints/step-N)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def check_run_directory(out: Path, resumed: Path | None = None) -> None:
    """`out` may take this run: a directory (or nothing yet) that holds no other run (a
    `latest` link, even one pointing at nothing, or a checkpoint); resuming, it may be the
    checkpoint's own run. (Whether it can be written, files.one_writer finds before any work.)"""
    if out.exists() and not out.is_dir():
        raise QkvError(f"--out {out} is a file; give a directory for the run")
    link = out / LATEST
    if link.is_symlink() or link.exists() or any((out / "checkpoints").glob("step-*")):
        if resumed is None:
            raise QkvError(
                f"{out} already holds a training run; pass --resume {out} to continue it, "
                "or choose another --out"
            )
        if run_directory(resumed).resolve() != out.resolve():
            raise QkvError(
                f"{out} holds another training run; resume into the checkpoint's own run "
                f"({run_directory(resumed)}) or give an --out without one"
            )


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The complete RUN/checkpoints/step-N of largest N (holding every file training writes:
    the model's or the adapter's config and weights, tokenizer, optimizer, trainer state)."""
    found = []
    for folder in (run_dir / "checkpoints").glob("step-*"):
        step = STEP.fullmatch(folder.name)
        model = (CONFIG, WEIGHTS) if (folder / CONFIG).is_file() else (ADAPTER_CONFIG, ADAPTER)
        needed = (*model, TOKENIZER, OPTIMIZER, TRAINER_STATE)
        if step and all((folder / name).is_file() for name in needed):
            found.append((int(step[1]), folder))
    return max(found)[1] if found else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's `latest` checkpoint; where `latest` points
    at nothing (its checkpoint deleted) or is missing (a run killed before linking its first),
    the run's newest complete checkpoint, with a warning naming both."""
    path = Path(path)
    if model_file(path, CONFIG) or model_file(path, ADAPTER_CONFIG):
        return path
    link = path / LATEST
    if link.exists():
        target = link.resolve()
        if not target.is_relative_to(path.resolve()):
            raise QkvError(
                f"{link} points outside its run directory (to {target}); give that checkpoint "
                "itself, or point the link at one of RUN/checkpoints"
            )
        return target
    if not path.exists():
        raise QkvError(f"no checkpoint at {path}: the path does not exist")
    newest = newest_checkpoint(path)
    if link.is_symlink():
        missing = f"{link} points at {os.readlink(link)}, which is missing"
        if newest is None:
            raise QkvError(
                f"{missing}, and {path / 'checkpoints'} holds no complete checkpoint; "
                "restore that checkpoint, or give another"
            )
    elif newest is None:
        raise QkvError(
            f"{path} is not a qkv checkpoint: it has no {CONFIG} and no '{LATEST}' link; "
            "give a run directory from `qkv train` or one of its checkpoints"
        )
    else:
        missing = f"{path} has no '{LATEST}' link"
    # stacklevel 1: one place, so Python's default filter shows it once however often resolved
    warnings.warn(f"{missing}; using the newest complete checkpoint, {newest}", stacklevel=1)
    return newest


def load_config(folder: Path) -> ModelConfig:
    """A qkv checkpoint's config.json (read by qkv.text.read_model_json), validated; an invalid
    one is a ConfigError naming it."""
    try:
        return ModelConfig.from_dict(read_model_json(folder, CONFIG))
    except ConfigError as err:
        raise ConfigError(f"{folder / CONFIG}: {err}") from None


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Tokenizer]:
    """(model in eval mode, its weights in `dtype`, tokenizer) from a checkpoint or run
    directory, or a Hugging Face model directory (read straight into `dtype`); a LoRA
    checkpoint gives its base model with the adapter applied (not merged)."""
    folder = resolve(path)
    if model_file(folder, ADAPTER_CONFIG):
        model, tokenizer = load_adapter_model(folder)
    elif hf.is_hf_directory(folder):
        model, tokenizer = hf.load_hf_directory(folder, dtype)
        vocabulary = folder / (TOKENIZER if model_file(folder, TOKENIZER) else "vocab.txt")
        check_vocabulary(model.config.vocab_size, tokenizer, folder / CONFIG, vocabulary)
    else:
        config = load_config(folder)
        tokenizer = Tokenizer.load(folder / TOKENIZER)
        check_vocabulary(config.vocab_size, tokenizer, folder / CONFIG, folder / TOKENIZER)
        _weights(folder, WEIGHTS, "checkpoint weight file")
        check_weights_fit(config, folder / WEIGHTS)
        check_model_fits(config, str(folder), fix=MORE_MEMORY)
        model = build_model(config)
        load_weights(model, folder / WEIGHTS)
    device = torch.device(device)
    if device.type == "cuda":  # built on the CPU (checked there): does it fit the GPU too?
        check_model_fits(model.config, str(folder), device, MORE_MEMORY)
    return model.to(device, dtype).eval(), tokenizer


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a Hugging Face directory's weights are stored in (config.json's dtype or
    torch_dtype); float32 for qkv's checkpoints."""
    if not hf.is_hf_directory(folder):
        return torch.float32
    config = hf.read_hf_config(folder)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_for_inference(
    path: str | Path, device: torch.device, dtype: str = "auto"
) -> tuple[Any, Tokenizer, str]:
    """load_model, then the model in the dtype choose_load_dtype picks, and one line saying
    what runs: the family, parameters, dtype (and why) and the memory its weights take."""
    folder = resolve(path)
    adapter = model_file(folder, ADAPTER_CONFIG) is not None
    base = Path(read_adapter_config(folder)["base"]) if adapter else folder
    chosen, why = choose_load_dtype(dtype, device, stored_dtype(base))
    model, tokenizer = load_model(folder, device, chosen)
    family = "qkv " + model.config.arch
    if hf.is_hf_directory(base):
        family = hf.FAMILIES[hf.read_hf_config(base)["model_type"]].name
    family += " + LoRA adapter" if adapter else ""
    count = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    dtype_name = str(chosen).removeprefix("torch.")
    memory = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    line = (
        f"model: {family}, {_amount(count)} parameters, {dtype_name} ({why}), {memory} on {device}"
    )
    return model, tokenizer, line


def _amount(count: int) -> str:
    """1,234,567 -> 1.23M; 1,100,048,384 -> 1.10B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def check_vocabulary(
    vocab_size: int, tokenizer: Tokenizer, config_path: Path, tokenizer_path: Path
) -> None:
    """A tokenizer fits a model of `vocab_size` embedding rows: never more tokens (their ids
    have no row), and as many unless it is a Hugging Face model's own tokenizer (whose model's
    embedding may be padded past it); qkv trains one row per token."""
    size = tokenizer.vocab_size
    if size > vocab_size:
        raise QkvError(
            f"the tokenizer {tokenizer_path} has {size} tokens but {config_path} says "
            f"vocab_size={vocab_size}: ids from {vocab_size} on have no embedding; the files do "
            "not belong together: put back the model's own tokenizer"
        )
    if size < vocab_size and not tokenizer.model_template:
        raise QkvError(
            f"the tokenizer {tokenizer_path} has {size} tokens but {config_path} says "
            f"vocab_size={vocab_size}: the model would generate ids the tokenizer cannot "
            "decode; the files do not belong together: put back the tokenizer it was trained with"
        )


def check_weights_fit(config: ModelConfig, path: Path) -> None:
    """The tensors a safetensors file's header lists fit the model `config` describes: checked
    on a model built on the meta device (no memory) before a real one is built, after the
    number of blocks (so that a config asking for 100,000 layers fails at once)."""
    header = files.read_safetensors_header(path, "checkpoint weight file")
    stacks: dict[str, set[int]] = {}
    for name in header:
        found = re.match(r"(\w*blocks)\.(\d+)\.", name)
        if found:
            stacks.setdefault(found[1], set()).add(int(found[2]))
    for stack, layers in stacks.items():
        if len(layers) != config.n_layers:
            raise QkvError(
                f"{path.parent / CONFIG} says n_layers={config.n_layers} but {path} holds "
                f"{len(layers)} of its {stack}: the files do not belong together"
            )
    with torch.device("meta"):
        expected = build_model(config.replace(init_std=None)).state_dict()
    files.check_fit(header, expected, "checkpoint", "the config", f"checkpoint weights {path}")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, naming any missing, unexpected or misshapen tensor
    (each cut into this process's shard where the model is sharded by FSDP2)."""
    expected = model.state_dict()
    weights = files.read_fitting(path, expected, "checkpoint", "the config")
    model.load_state_dict({name: shard_as(t, expected[name]) for name, t in weights.items()})


def _weights(folder: Path, name: str, what: str) -> Path:
    """FOLDER/NAME, a weight file, once qkv.text.model_file finds it a regular file inside the
    directory; a missing one is a QkvError naming it as `what`."""
    path = model_file(folder, name)
    if path is None:
        raise QkvError(f"{what} {folder / name} is missing")
    return path


def weights_digest(folder: Path) -> str:
    """SHA-256 of a checkpoint's model.safetensors: which base model an adapter belongs to."""
    digest = hashlib.sha256()
    with open(_weights(folder, WEIGHTS, "weight file"), "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter_config.json of a LoRA checkpoint (read by qkv.text.read_model_json), its
    fields checked: present, of their types and ranges."""
    path = folder / ADAPTER_CONFIG
    adapter = read_model_json(folder, ADAPTER_CONFIG)
    missing = [k for k in ADAPTER_FIELDS if k not in adapter]
    if missing:
        raise QkvError(f"{path} lacks the field(s) {', '.join(missing)}")
    check_fields(adapter, ADAPTER_FIELDS, f"{path}: ")
    return adapter


def load_adapter_model(folder: Path) -> tuple[Any, Tokenizer]:
    """The base model named by the adapter's config (checked against its SHA-256), grown to the
    adapter's vocabulary, with LoRA layers holding the adapter's tensors."""
    adapter = read_adapter_config(folder)
    base = Path(adapter["base"])
    if not base.is_dir() or model_file(base, WEIGHTS) is None:
        raise QkvError(
            f"{folder} is a LoRA adapter for the base model {base}, which is missing: "
            "restore it there, or merge the adapter (qkv merge) where it exists"
        )
    if weights_digest(base) != adapter["base_sha256"]:
        raise QkvError(
            f"the base model {base} changed since the adapter in {folder} was trained "
            "(its weights' SHA-256 differs): the adapter only fits the weights it was trained on"
        )
    model, _ = load_model(base)
    tokenizer = Tokenizer.load(folder / TOKENIZER)
    grow_vocabulary(model, tokenizer)
    check_vocabulary(model.config.vocab_size, tokenizer, base / CONFIG, folder / TOKENIZER)
    targets = tuple(adapter["targets"])
    add_lora(model, adapter["rank"], adapter["alpha"], adapter["dropout"], targets)
    load_adapter_weights(model, _weights(folder, ADAPTER, "adapter weight file"))
    return model, tokenizer


def load_adapter_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a LoRA adapter's tensors into a model that has its LoRA layers."""
    weights = files.read_fitting(path, lora_state_dict(model), "adapter", "the model")
    model.load_state_dict(weights, strict=False)


def _check_resumable(folder: Path) -> None:
    """Raise a QkvError unless `folder` holds the optimizer and trainer state training wrote."""
    missing = [name for name in (OPTIMIZER, TRAINER_STATE) if model_file(folder, name) is None]
    if missing:
        raise QkvError(
            f"{folder} cannot be resumed: {missing[0]} is missing "
            "(only checkpoints written by `qkv train` or `qkv finetune` hold the optimizer state)"
        )


def load_training_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer + RNG tensors, trainer state) of a checkpoint written by training."""
    _check_resumable(folder)
    tensors = files.read_safetensors(folder / OPTIMIZER, "optimizer state")
    return tensors, read_model_json(folder, TRAINER_STATE)


@dataclass(frozen=True)
class RunInfo:
    """What a training checkpoint's trainer_state.json says about its run.

    folder: the checkpoint directory; run_dir: the run it belongs to; kind: "train", "finetune"
    or "seq2seq"; step: the optimizer steps taken; train_config: the run's settings.
    """

    folder: Path
    run_dir: Path
    kind: str
    step: int
    train_config: TrainConfig

    def require(self, kind: str) -> None:
        """Raise a QkvError naming what continues this run unless it is a `kind` run (what the
        caller resumes: "train", "finetune" or "seq2seq")."""
        if self.kind != kind:
            what, continued_by = KINDS[self.kind]
            raise QkvError(f"{self.run_dir} is {what}: continue it with {continued_by}")


def read_run(path: str | Path) -> RunInfo:
    """The run of a training checkpoint or run directory (its latest checkpoint), to resume:
    a QkvError when its optimizer or trainer state is missing or corrupt, or was written by
    another version of qkv."""
    folder = resolve(path)
    _check_resumable(folder)
    return _run_info(folder)


def find_run(path: str | Path) -> RunInfo | None:
    """The run a checkpoint belongs to, or None for one not written by training (no
    trainer_state.json: a model from qkv merge, a Hugging Face directory)."""
    folder = resolve(path)
    return _run_info(folder) if model_file(folder, TRAINER_STATE) else None


def _run_info(folder: Path) -> RunInfo:
    state = read_model_json(folder, TRAINER_STATE)
    path = folder / TRAINER_STATE
    train_config, step = state.get("train_config"), state.get("step")
    if not isinstance(train_config, dict) or not isinstance(step, int):
        raise QkvError(f"{path} was not written by this version of qkv train")
    kind = state.get("kind")
    if kind is None:  # written before runs recorded their kind
        seq2seq = model_file(folder, CONFIG) and load_config(folder).arch == "encoder-decoder"
        kind = "seq2seq" if seq2seq else "train"
    if kind not in KINDS:
        raise QkvError(f"{path} names an unknown kind of run {kind!r}; qkv knows "
                       f"{', '.join(KINDS)}")  # fmt: skip
    try:
        settings = TrainConfig(**train_config)
    except TypeError:  # a field this version does not have
        raise QkvError(f"{path} was not written by this version of qkv train") from None
    return RunInfo(folder, run_directory(folder), kind, step, settings)
