"""A model's own chat template: rendered as transformers' apply_chat_template renders it, for three
templates written here in the style of three families, and replies that end at each eos id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli_generate import qkv

from qkv.chat_template import chat_prompt, render_model_template
from qkv.errors import QkvError
from qkv.generate import GenerationConfig, Generator
from qkv.hf import load_hf_tokenizer

# Qwen's ChatML, with the default system prompt Qwen2.5 adds when none is given.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3's headers, after the bos token, each message trimmed.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Gemma's turns: the system message folded into the first user turn, "model" for the
# assistant, and roles that must alternate (raise_exception otherwise).
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}
    {{- message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""
# Phi-3's role tokens, which are qkv's own (<|system|>, <|user|>, <|assistant|>): its template,
# not qkv's, is the one it was trained on.
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{{ '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, "<|endoftext|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<end_of_turn>"),
    "phi3": (PHI3, "<s>", "<|end|>"),
}
# Every tokenizer also has qkv's role tokens: a model's own template still wins.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>", "<s>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "  It writes an object as JSON text. "},
    {"role": "user", "content": "And json.loads?"},
]
WORDS = "You answer in one line . What does json dumps do ? It writes an object as JSON text And"


def write_directory(folder: Path, template: str, bos: str, eos: str) -> Path:
    """A tokenizer directory transformers' AutoTokenizer loads: tokenizer.json (words, the
    specials above), tokenizer_config.json with the chat template."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = sorted(set(WORDS.split()) | {"loads", "system", "user", "assistant", "model", "a",
                                          "helpful", "<unk>"})  # fmt: skip
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": template}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_the_template_renders_as_transformers_renders_it(style: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = write_directory(tmp_path / style, *TEMPLATES[style])
    theirs = AutoTokenizer.from_pretrained(str(folder))
    ours = load_hf_tokenizer(folder, {})
    for messages in (CONVERSATION, CONVERSATION[1:2]):  # with and without a system prompt
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_model_template(ours, messages) == expected
        ids = theirs(expected, add_special_tokens=False)["input_ids"]
        turns = [(m["role"], m["content"]) for m in messages]
        assert chat_prompt(turns, ours) == ids
    without = theirs.apply_chat_template(CONVERSATION, tokenize=False)
    assert render_model_template(ours, CONVERSATION, add_generation_prompt=False) == without


def test_a_template_that_refuses_the_conversation_is_one_clear_error(tmp_path: Path) -> None:
    folder = write_directory(tmp_path / "gemma", *TEMPLATES["gemma"])
    ours = load_hf_tokenizer(folder, {})
    twice = [("user", "What does json.dumps do?"), ("user", "And json.loads?")]
    with pytest.raises(QkvError, match="refuses this conversation: Conversation roles must"):
        chat_prompt(twice, ours)


def test_a_template_cannot_reach_python_internals(tmp_path: Path) -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    folder = write_directory(tmp_path / "evil", escape, "<bos>", "<eos>")
    with pytest.raises(QkvError, match="chat template failed"):
        chat_prompt([("user", "What")], load_hf_tokenizer(folder, {}))


@pytest.mark.slow
@torch.no_grad()
def test_generation_stops_at_each_eos_id_the_model_names(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = write_directory(tmp_path / "model", *TEMPLATES["chatml"])
    vocab = json.loads((folder / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(SPECIALS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, eos_token_id=None,
                         bos_token_id=None, pad_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    greedy = GenerationConfig(temperature=0, max_new_tokens=12)
    end = size - len(SPECIALS)  # <|endoftext|>: the tokenizer's end-of-text for this directory
    prompt = chat_prompt([("user", "What does json.dumps do?")], load_hf_tokenizer(folder, {}))

    def write(eos_ids: list[int]) -> list[int]:
        generation = {"eos_token_id": eos_ids}
        (folder / "generation_config.json").write_text(json.dumps(generation))
        config_json = json.loads((folder / "config.json").read_text()) | {"eos_token_id": end}
        (folder / "config.json").write_text(json.dumps(config_json))
        completion = Generator.load(folder).generate(prompt, greedy)
        return completion.token_ids if completion.stop_reason == "eos" else [-1]

    free = Generator.load(folder).generate(prompt, greedy).token_ids
    first = {token: i for i, token in reversed(list(enumerate(free)))}  # first place of each
    a, b = [token for token in dict.fromkeys(free) if first[token] > 0][:2]
    never = next(token for token in range(size) if token not in free and token != end)
    assert write([a, b]) == free[: first[a]]  # stops at the first of the list it meets
    assert write([never, b]) == free[: first[b]]  # and at any other
    reply = Generator.load(folder).tokenizer.decode(free[: first[b]])
    greedy_options = ["--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "12"]
    chat = qkv("chat", "--model", str(folder), "-p", "What does json.dumps do?", *greedy_options)
    assert chat.returncode == 0 and chat.stdout == reply + "\n", chat.stderr
    one = qkv("generate", "--model", str(folder), "--chat", "What does json.dumps do?",
              *greedy_options)  # fmt: skip
    assert one.returncode == 0 and one.stdout == reply + "\n", one.stderr
    from fastapi.testclient import TestClient

    from qkv.server import create_app, load_served

    served = load_served(folder, "cpu")
    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    with TestClient(create_app(served)) as client:
        tokens = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
        answer = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12,
                                                           "temperature": 0}).json()  # fmt: skip
    served.engine.stop()
    assert tokens == prompt and answer["choices"][0]["message"]["content"] == reply
    assert answer["choices"][0]["finish_reason"] == "stop"
