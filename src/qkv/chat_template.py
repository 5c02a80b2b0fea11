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
model qkv fine-tuned chats in qkv's template, the one it was trained on. The template renders in
a separate process, bounded in time, memory and output (template_sandbox).

Messages are plain text in a model's own template too, unlike transformers' apply_chat_template
and vLLM, which tokenize the whole rendering with its special tokens: there a user message
spelling "<|im_end|>\n<|im_start|>system\n..." is a system turn. chat_prompt encodes the text
of a message that spells a special token (or begins or ends with part of one) as plain text,
the template's own text as the tokenizer reads it; special_in_content=True (`qkv chat` and
`qkv serve` --special-tokens-in-content) tokenizes as transformers does. Token ids equal
transformers' whenever no message spells a special token.
"""

from __future__ import annotations

import re
import secrets
from functools import lru_cache

import torch
from torch import Tensor, nn

from qkv import template_sandbox
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


def chat_prompt(
    turns: list[tuple[str, str]], tokenizer: Tokenizer, special_in_content: bool = False
) -> list[int]:
    """The token ids after which the model writes the assistant's reply to (role, text) turns:
    the model's own template where it has one, rendered with a generation prompt and tokenized
    as transformers does (special tokens in the rendered text are the model's, none added),
    except that the messages' text stays plain text unless `special_in_content` (see the
    module's docstring); else qkv's (answer_prompt). Any problem is one QkvError."""
    if tokenizer.chat_template is None:
        return answer_prompt(turns, tokenizer)
    messages = [{"role": role, "content": text} for role, text in turns]
    rendered = render_model_template(tokenizer, messages)
    spelled = {} if special_in_content else _spelled_specials(tokenizer, turns)
    if spelled:
        ids = _encode_with_plain_content(tokenizer, messages, rendered, spelled)
    else:
        ids = tokenizer.encode(rendered)
    if not ids:
        raise QkvError("the model's chat template rendered an empty prompt for this "
                       "conversation; fix chat_template in the model directory")  # fmt: skip
    return ids


def _spelled_specials(tokenizer: Tokenizer, turns: list[tuple[str, str]]) -> dict[int, str]:
    """The turns whose text spells one of the tokenizer's special tokens, or begins or ends
    with part of one (which the template's text beside it could complete): {index: token}."""
    specials = tuple(
        added.content
        for added in tokenizer.backend.get_added_tokens_decoder().values()
        if added.special and added.content
    )
    if not specials:
        return {}
    whole, heads, tails = _special_parts(specials)
    longest = max(map(len, specials))
    spelled = {}
    for index, (_, text) in enumerate(turns):
        found = whole.search(text)
        if found:
            spelled[index] = found.group()
            continue
        for k in range(1, longest):
            end = heads.get(text[-k:]) or heads.get(text.rstrip()[-k:])
            start = tails.get(text[:k]) or tails.get(text.lstrip()[:k])
            if end or start:
                spelled[index] = end or start
                break
    return spelled


@lru_cache(maxsize=4)
def _special_parts(
    specials: tuple[str, ...],
) -> tuple[re.Pattern[str], dict[str, str], dict[str, str]]:
    """A pattern matching any of `specials`, and their proper prefixes and suffixes, each
    mapped to its token."""
    whole = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    heads = {token[:k]: token for token in specials for k in range(1, len(token))}
    tails = {token[k:]: token for token in specials for k in range(1, len(token))}
    return whole, heads, tails


def _encode_with_plain_content(
    tokenizer: Tokenizer, messages: list[dict[str, str]], rendered: str, spelled: dict[int, str]
) -> list[int]:
    """Token ids of `rendered` with the text of the `spelled` messages encoded as plain text
    (Tokenizer.encode_plain) and the template's own text as encode() reads it. Where that text
    lies, a second rendering tells: those messages wrapped in markers (after their leading and
    before their trailing whitespace, which a template may trim); it must equal the first with
    the markers taken out, each marker paired, or the message is refused."""
    nonce = secrets.randbits(64)
    opening, closing = f"\U000f0000{nonce}\U000f0001", f"\U000f0001{nonce}\U000f0000"
    marked = [dict(message) for message in messages]
    for index in spelled:
        text = marked[index]["content"]
        core = text.strip()
        start = len(text) - len(text.lstrip())
        marked[index]["content"] = (
            text[:start] + opening + core + closing + text[start + len(core) :]
        )
    first, *pieces = render_model_template(tokenizer, marked).split(opening)
    template_parts, contents, paired = [first], [], closing not in first
    for piece in pieces:
        content, found, after = piece.partition(closing)
        paired = paired and bool(found) and closing not in after
        contents.append(content)
        template_parts.append(after)
    plain = "".join(
        part + content for part, content in zip(template_parts, [*contents, ""], strict=True)
    )
    if not paired or plain != rendered:
        token = next(iter(spelled.values()))
        raise QkvError(
            f"a message spells a special token of the model ({token}) and the model's chat "
            "template changes messages too much for qkv to keep that text plain: remove it, or "
            "let messages hold special tokens (--special-tokens-in-content)"
        )
    template_ids = tokenizer.encode_batch(template_parts)
    content_ids = tokenizer.encode_plain_batch(contents)
    return [
        token_id
        for part, content in zip(template_ids, [*content_ids, []], strict=True)
        for token_id in (*part, *content)
    ]


def chat_stops(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Stop strings of a reply: none for a model's own template (its eos ids, Tokenizer.stop_ids,
    end the reply); qkv's role tokens for qkv's."""
    if tokenizer.chat_template is None:
        return tuple(ROLE_TOKENS.values())
    return ()


def render_model_template(
    tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The tokenizer's own chat template rendered over `messages` ({"role", "content"} each),
    with add_generation_prompt and the special tokens it names (bos_token, eos_token, ...); a
    template that fails or refuses the conversation is one QkvError with its message."""
    if tokenizer.chat_template is None:
        raise QkvError("this model has no chat template of its own")
    return template_sandbox.render(
        tokenizer.chat_template, messages, add_generation_prompt, tokenizer.template_tokens
    )
