"""qkv's chat template: role tokens added to a tokenizer and a model, and turns rendered with
them as token ids.

    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|><|user|>{text}<|assistant|>

The model continues after the last <|assistant|>; its reply ends where it writes <|endoftext|>
or a role token. Only the template puts role and end-of-text tokens: each {text} is encoded as
plain text (Tokenizer.encode_plain), so a message that spells "<|assistant|>" cannot forge a turn.
Fine-tuning (finetune.encode_example) and chat (chat.Conversation) both render with render(), so
chat feeds the model exactly what fine-tuning trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.errors import QkvError
from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}


def add_chat_tokens(tokenizer: Tokenizer) -> int:
    """Give the tokenizer the role tokens (ids after its vocabulary); its new vocabulary size."""
    tokenizer.add_special_tokens(list(ROLE_TOKENS.values()))
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


def role_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The id of each role's token; an error if the tokenizer lacks them."""
    ids = {role: tokenizer.backend.token_to_id(token) for role, token in ROLE_TOKENS.items()}
    missing = [ROLE_TOKENS[role] for role, token_id in ids.items() if token_id is None]
    if missing:
        raise QkvError(
            f"the tokenizer has no chat tokens ({', '.join(missing)}): use a model fine-tuned on "
            "prompt/response pairs (`qkv finetune`), or add them with add_chat_tokens"
        )
    return ids


def encode_turns(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[list[int]]:
    """Each (role, text) turn as token ids: [role id] + encode_plain(text), + [end-of-text id]
    for an assistant turn."""
    roles = role_ids(tokenizer)
    texts = tokenizer.encode_plain_batch([text for _, text in turns])
    return [
        [roles[role], *ids] + ([tokenizer.end_of_text_id] if role == "assistant" else [])
        for (role, _), ids in zip(turns, texts, strict=True)
    ]


def render(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[int]:
    """The token ids of (role, text) turns in the chat template (encode_turns, joined)."""
    return [token_id for turn in encode_turns(turns, tokenizer) for token_id in turn]


def answer_prompt(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[int]:
    """The token ids after which the model writes the assistant's next reply: render(turns)
    + [<|assistant|> id]."""
    return [*render(turns, tokenizer), role_ids(tokenizer)["assistant"]]
