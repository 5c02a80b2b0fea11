"""Token selection: turning next-token probabilities into text.

sample: x_{t+1} ~ softmax(logits_t / temperature), restricted to the top_k most likely tokens.
"""

from __future__ import annotations

import torch

from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer


@torch.no_grad()
def sample(
    model: DecoderLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` (stops at <|endoftext|>), decoding by full recomputation."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.end_of_text_id]
    new: list[int] = []
    window = model.config.max_seq_len
    for _ in range(max_new_tokens):
        context = torch.tensor([(ids + new)[-window:]], device=device)
        logits = model(context)[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if token == tokenizer.end_of_text_id:
            break
        new.append(token)
    return tokenizer.decode(new)
