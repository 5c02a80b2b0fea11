"""qkv's chat template: role tokens added to a tokenizer and a model, and turns rendered with
them.

    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|><|user|>{text}<|assistant|>

The model continues after the last <|assistant|>; its reply ends where it writes <|endoftext|>
or a role token. Tokenized, the text is exactly what fine-tuning trained on (special tokens are
matched before the text between them is split into tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}


def add_chat_tokens(tokenizer: Tokenizer) -> int:
    """Give the tokenizer the role tokens (ids after its vocabulary); its new vocabulary size."""
    tokenizer.backend.add_special_tokens(list(ROLE_TOKENS.values()))
    return tokenizer.vocab_size


def grow_vocabulary(model: DecoderLM, tokenizer: Tokenizer) -> None:
    """Add embedding rows (and rows of an untied head) for the tokenizer's new tokens; the
    config follows. A new token <|word|> starts as the mean of the rows of the tokens spelling
    "word" (so <|user|> and <|assistant|> differ even where they stay frozen, as under LoRA);
    any other as the mean of all rows."""
    old, new = model.config.vocab_size, tokenizer.vocab_size
    if new <= old:
        return
    spellings = []
    for token_id in range(old, new):
        word = (tokenizer.backend.id_to_token(token_id) or "").strip("<|>")
        spellings.append([i for i in tokenizer.encode(word) if i < old] if word else [])

    def grown(table: Tensor) -> nn.Parameter:
        rows = [table[ids].mean(0) if ids else table.mean(0) for ids in spellings]
        return nn.Parameter(torch.cat([table, torch.stack(rows)]))

    with torch.no_grad():
        embedding = model.embedder.token_embedding
        embedding.weight = grown(embedding.weight)
        if model.head.weight is not None:
            model.head.weight = grown(model.head.weight)
    model.config = model.config.replace(vocab_size=new)


def render(turns: list[tuple[str, str]], end_of_text: str) -> str:
    """(role, text) turns in the chat template; each assistant turn is closed by end_of_text."""
    return "".join(
        ROLE_TOKENS[role] + text + (end_of_text if role == "assistant" else "")
        for role, text in turns
    )


def answer_prompt(turns: list[tuple[str, str]], end_of_text: str) -> str:
    """The text after which the model writes the assistant's next reply."""
    return render(turns, end_of_text) + ROLE_TOKENS["assistant"]
