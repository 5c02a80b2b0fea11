"""Chat: a conversation kept as turns, rendered in the fine-tuning chat template and trimmed to
the context window.

    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|><|user|>{text}<|assistant|>

The model continues after the last <|assistant|>; its reply ends where it writes <|endoftext|>
or a role token. Tokenized, the text is exactly what fine-tuning trained on (special tokens are
matched before the text between them is split into tokens).
"""

from __future__ import annotations

from qkv.errors import QkvError
from qkv.finetune import ROLE_TOKENS
from qkv.tokenizer import Tokenizer


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
