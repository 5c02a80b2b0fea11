"""The chat template: role tokens added to a tokenizer and a model, conversations rendered with
them and trimmed to the context window.

    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|><|user|>{text}<|assistant|>

The model continues after the last <|assistant|>; its reply ends where it writes <|endoftext|>
or a role token. Tokenized, the text is exactly what fine-tuning trained on (special tokens are
matched before the text between them is split into tokens).
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


class Conversation:
    """A multi-turn chat whose prompt fits the context window: when the history outgrows
    window - reserve tokens (reserve: room for the reply), the oldest exchanges are dropped;
    the system message (if any) is always kept, and a message that cannot fit is refused."""

    def __init__(
        self, tokenizer: Tokenizer, window: int, reserve: int, system: str | None = None
    ) -> None:
        missing = [t for t in ROLE_TOKENS.values() if tokenizer.backend.token_to_id(t) is None]
        if missing:
            raise QkvError(
                f"the model's tokenizer has no chat tokens ({', '.join(missing)}): chat needs a "
                "model fine-tuned on prompt/response pairs, e.g. by `qkv finetune`"
            )
        self.tokenizer = tokenizer
        self.window, self.reserve = window, reserve
        self.system = [("system", system)] if system else []
        self.exchanges: list[tuple[str, str]] = []  # (user message, assistant reply)

    def prompt(self, message: str) -> tuple[str, int]:
        """The prompt for the reply to `message`, and how many old exchanges it had to drop."""
        dropped = 0
        while True:
            turns = list(self.system)
            for user, assistant in self.exchanges:
                turns += [("user", user), ("assistant", assistant)]
            text = answer_prompt([*turns, ("user", message)], self.tokenizer.end_of_text)
            tokens = len(self.tokenizer.encode(text))
            if tokens <= self.window - self.reserve:
                return text, dropped
            if not self.exchanges:
                raise QkvError(
                    f"the message needs {tokens} tokens with the chat template (and the system "
                    f"message); the model's context of {self.window} tokens leaves "
                    f"{self.window - self.reserve} after room for the reply: shorten it"
                )
            self.exchanges.pop(0)
            dropped += 1

    def add(self, message: str, reply: str) -> None:
        self.exchanges.append((message, reply))

    def reset(self) -> None:
        self.exchanges.clear()
