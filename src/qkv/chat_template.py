"""Chat templates: qkv's own (role tokens added to a tokenizer and a model, turns rendered with
them as token ids) and a model's own (its Jinja template, rendered as transformers renders it).

    <|system|>{text}<|user|>{text}<|assistant|>{text}<|endoftext|><|user|>{text}<|assistant|>

The model continues after the last <|assistant|>; its reply ends where it writes <|endoftext|>
or a role token. Only the template puts role and end-of-text tokens: each {text} is encoded as
plain text (Tokenizer.encode_plain), so a message that spells "<|assistant|>" cannot forge a turn.
Fine-tuning (finetune.encode_example) and chat (chat.Conversation) both render with render(), so
chat feeds the model exactly what fine-tuning trained on.

A Hugging Face instruct model brings its own template (tokenizer_config.json's chat_template or
chat_template.jinja): chat_prompt renders it whenever there is one (even where the tokenizer
spells roles as qkv does, as Phi-3's), so a model sees the format it was trained on; its replies
end at its eos ids (generation_config.json). A qkv checkpoint keeps no template of its own: a
model qkv fine-tuned chats in qkv's template, the one it was trained on.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.sandbox
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
            f"the model has no chat template: no role tokens ({', '.join(missing)}) and no "
            "chat_template of its own; use a model fine-tuned on prompt/response pairs "
            "(`qkv finetune`), or add them with add_chat_tokens"
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


def has_role_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has qkv's role tokens (a model qkv fine-tuned)."""
    return all(tokenizer.backend.token_to_id(t) is not None for t in ROLE_TOKENS.values())


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the model can chat: qkv's role tokens, or a template of its own."""
    return has_role_tokens(tokenizer) or tokenizer.chat_template is not None


def chat_prompt(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[int]:
    """The token ids after which the model writes the assistant's reply to (role, text) turns:
    the model's own template where it has one, rendered with a generation prompt and tokenized
    as transformers does (special tokens in the rendered text are the model's, none added); else
    qkv's (answer_prompt)."""
    if tokenizer.chat_template is None:
        return answer_prompt(turns, tokenizer)
    messages = [{"role": role, "content": text} for role, text in turns]
    return tokenizer.encode(render_model_template(tokenizer, messages))


def chat_stops(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Stop strings of a reply: none for a model's own template (its eos ids, Tokenizer.stop_ids,
    end the reply); qkv's role tokens for qkv's."""
    if tokenizer.chat_template is None:
        return tuple(ROLE_TOKENS.values())
    return ()


class _TemplateRefused(Exception):
    """raise_exception(message) called by a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
    """json.dumps without Jinja's HTML escaping (as transformers' templates expect)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """`template` compiled in the sandbox transformers uses: immutable, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, strftime_now and a plain tojson."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_model_template(
    tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The tokenizer's own chat template rendered over `messages` ({"role", "content"} each),
    with add_generation_prompt and the special tokens it names (bos_token, eos_token, ...); a
    template that fails or refuses the conversation is one QkvError with its message."""
    if tokenizer.chat_template is None:
        raise QkvError("this model has no chat template of its own")
    try:
        template = _compiled(tokenizer.chat_template)
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **tokenizer.template_tokens,
        )  # fmt: skip
    except _TemplateRefused as refused:
        raise QkvError(f"the model's chat template refuses this conversation: {refused}") from None
    except (jinja2.TemplateError, TypeError, ValueError, OverflowError, KeyError) as err:
        raise QkvError(f"the model's chat template failed: {err}") from None
