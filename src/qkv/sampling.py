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

import torch
from torch import Tensor

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
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generators: list[torch.Generator] | None = None,
) -> Tensor:
    """logits (batch, V) -> token ids (batch,): argmax when temperature is below GREEDY_BELOW
    (0 included), else one draw per row from softmax(filtered logits / temperature), row i using
    generators[i] (so a row's draws do not depend on what else is in the batch)."""
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # Scaled from the row's maximum (softmax is unchanged by the shift), so that a tiny
    # temperature gives -inf, not inf - inf; a +inf logit (from a tiny repetition penalty)
    # counts as the largest float.
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat(
        [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators, strict=True)]
    )
