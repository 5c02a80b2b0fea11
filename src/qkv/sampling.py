"""Token selection: next-token logits (batch, vocab_size) in, one token id per row out.

greedy       x = argmax_v logit_v                      (temperature 0)
sampling     x ~ softmax(logit / temperature)          (T < 1 sharpens, T > 1 flattens)
top-k        only the k largest logits stay candidates
top-p        only the smallest set of most likely tokens whose probability reaches p (nucleus)
repetition   a token already in the text: logit / penalty if positive, logit * penalty if not
             (Keskar et al. 2019, CTRL; Hugging Face's RepetitionPenaltyLogitsProcessor too)
Applied in that order, as Hugging Face's generate does: repetition, temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.config import GENERATION
from qkv.errors import QkvError

# Temperatures below this are greedy: the draw would be argmax anyway, and dividing by a
# denormal temperature (flushed to zero when torch.set_flush_denormal is on) would give NaN.
GREEDY_BELOW = 1e-4


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (batch, V), seen (batch, V) bool -> logits with every seen token made less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the row's k-th largest to -inf (ties with it stay)."""
    if k >= logits.shape[-1]:
        return logits
    cutoff = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < cutoff, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the most likely tokens until their probabilities sum to >= p; -inf for the rest.

    A token is dropped when the tokens ranked above it already reach p, so the top token stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False  # rounding can make the top token's mass_above exceed a tiny p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; temperature 0 is greedy, top_k None (or 0) and top_p 1
    keep every token, repetition_penalty 1 is none."""

    temperature: float = GENERATION["temperature"]
    top_k: int | None = GENERATION["top_k"]
    top_p: float = GENERATION["top_p"]
    repetition_penalty: float = GENERATION["repetition_penalty"]

    def __post_init__(self) -> None:
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)  # 0: every token is a candidate
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy decoding)"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 0 (0 keeps every token)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 keeps every token)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 is none)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise QkvError(f"{name.replace('_', '-')} {rule}; got {getattr(self, name)!r}")


PLAIN = SamplingConfig(temperature=1.0, top_k=None)  # a draw from softmax(logits) itself


def distribution(
    logits: Tensor, config: SamplingConfig = PLAIN, seen: Tensor | None = None
) -> Tensor:
    """logits (batch, V) -> the probabilities (batch, V) that `select` draws from: every rule of
    `config` in Hugging Face's order, the repetition penalty on the tokens `seen` (batch, V)
    marks, then softmax(top-p(top-k(logits / temperature))); one-hot on the argmax when the
    temperature is below GREEDY_BELOW (0 included)."""
    logits = _penalized(logits, config, seen)
    if config.temperature < GREEDY_BELOW:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    # Scaled from the row's maximum (softmax is unchanged by the shift), so that a tiny
    # temperature gives -inf, not inf - inf; a +inf logit (from a tiny repetition penalty)
    # counts as the largest float.
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    logits = top_p_filter(logits, config.top_p)
    return torch.softmax(logits, dim=-1)


def finite_rows(logits: Tensor) -> Tensor:
    """logits (batch, V) -> (batch,) bool: whether max_v logit_v is finite, i.e. the row holds
    no NaN and no +inf and not only -inf (a broken model's; nothing sensible can be chosen)."""
    return torch.isfinite(logits.amax(dim=-1))


def select(
    logits: Tensor,
    config: SamplingConfig = PLAIN,
    seen: Tensor | None = None,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """logits (batch, V) -> token ids (batch,): the argmax when greedy, else one draw per row
    from `distribution(logits, config, seen)`, row i using generators[i] (so a row's draws do
    not depend on what else is in the batch). Always ids below V, even for rows that
    `finite_rows` refuses (whose ids mean nothing)."""
    if config.temperature < GREEDY_BELOW:
        return _penalized(logits, config, seen).argmax(dim=-1)
    return draw(distribution(logits, config, seen), generators)


def _penalized(logits: Tensor, config: SamplingConfig, seen: Tensor | None) -> Tensor:
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, config.repetition_penalty)
    return logits


def draw(probs: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
    """One token per row of probs (batch, V) by inverting the CDF: the first v with
    sum_{w <= v} p_w > u * sum_w p_w, for u ~ U[0, 1) from the row's generator. A token of
    probability 0 is never drawn; one uniform per row, where torch.multinomial draws V. A row
    with no such v (all zeros, NaN) gets V - 1: never an id past the vocabulary."""
    if generators is None:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    else:
        u = torch.cat([torch.rand(1, 1, dtype=torch.float64, device=probs.device, generator=g)
                       for g in generators])  # fmt: skip
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # u * total can round up to total itself; below it, the first cdf > v has p > 0.
    v = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
