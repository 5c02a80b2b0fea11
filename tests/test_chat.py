"""Chat: the template matches fine-tuning's, history is trimmed to the window, and `qkv chat`
answers piped and interactive input, keeps the conversation, resets and exits cleanly."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli_generate import TEXT, checkpoint, qkv

from qkv.chat import Conversation
from qkv.chat_template import add_chat_tokens, answer_prompt, render
from qkv.checkpoint import write_checkpoint
from qkv.config import ModelConfig
from qkv.finetune import Example, encode_example
from qkv.generate import GenerationConfig, Generator
from qkv.model import build_model
from qkv.tokenizer import Tokenizer

ROLE_STOPS = ("<|system|>", "<|user|>", "<|assistant|>")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A small random decoder with the chat tokens, as `qkv finetune` leaves one."""
    tokenizer = Tokenizer.train_char([TEXT])
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                         max_seq_len=96, position="rope", init_std=0.3)  # fmt: skip
    model = build_model(config)
    with torch.no_grad():  # greedy replies in TEXT's letters, and different for each prompt
        table = model.embedder.token_embedding.weight
        letters = torch.zeros(len(table), dtype=torch.bool)
        letters[tokenizer.encode(TEXT)] = True
        table[~letters] *= 0.01
    return write_checkpoint(tmp_path_factory.mktemp("chat") / "chat", model, tokenizer)


def test_rendered_conversations_tokenize_as_fine_tuning_encodes_them() -> None:
    tokenizer = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    add_chat_tokens(tokenizer)
    turns = [("system", "be brief"), ("user", "the fox?"), ("assistant", "jumps over"),
             ("user", "the dog?"), ("assistant", "lazy")]  # fmt: skip
    ids, _ = encode_example(Example(tuple(turns)), tokenizer)
    spelled = ("<|system|>be brief<|user|>the fox?<|assistant|>jumps over<|endoftext|>"
               "<|user|>the dog?<|assistant|>lazy<|endoftext|>")  # fmt: skip
    assert render(turns, tokenizer) == ids == tokenizer.encode(spelled)
    prompt = answer_prompt(turns[:3], tokenizer)
    assert prompt == tokenizer.encode(
        "<|system|>be brief<|user|>the fox?<|assistant|>jumps over<|endoftext|><|assistant|>"
    )


def test_the_conversation_drops_its_oldest_exchanges_to_fit_but_keeps_the_system(
    chat_dir: Path,
) -> None:
    tokenizer = Tokenizer.load(chat_dir)
    conversation = Conversation(tokenizer, window=60, reserve=10, system="be kind")
    for i in range(4):
        conversation.add(f"question {i}", f"answer {i}")
    ids, dropped = conversation.prompt("last one")
    prompt = tokenizer.decode(ids)
    assert len(ids) <= 50
    assert dropped >= 1 and prompt.startswith("<|system|>be kind<|user|>question ")
    assert "answer 3<|endoftext|><|user|>last one<|assistant|>" in prompt
    assert "question 0" not in prompt
    kept = 4 - dropped
    assert [q for q, _ in conversation.exchanges] == [f"question {i}" for i in range(dropped, 4)]
    assert kept == len(conversation.exchanges)


def expected_reply(chat_dir: Path, prompt: str, new: int) -> str:
    generator = Generator.load(chat_dir)
    config = GenerationConfig(max_new_tokens=new, temperature=0, stop=ROLE_STOPS)
    return generator.generate(prompt, config).text


GREEDY = ["--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "6"]


def test_piped_chat_keeps_history_resets_and_exits_cleanly(chat_dir: Path) -> None:
    script = "the fox\nthe dog\n/reset\nthe fox\n/exit\nnever read\n"
    result = qkv("chat", "--model", str(chat_dir), *GREEDY, stdin=script)
    assert result.returncode == 0, result.stderr
    first = expected_reply(chat_dir, "<|user|>the fox<|assistant|>", 6)
    second = expected_reply(
        chat_dir, f"<|user|>the fox<|assistant|>{first}<|endoftext|><|user|>the dog<|assistant|>", 6
    )
    assert second != expected_reply(chat_dir, "<|user|>the dog<|assistant|>", 6)  # history counts
    assert first and second
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "forgotten" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_shot_chat_answers_and_chat_needs_chat_tokens(chat_dir: Path, tmp_path: Path) -> None:
    result = qkv("chat", "--model", str(chat_dir), "-p", "the fox", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_reply(chat_dir, "<|user|>the fox<|assistant|>", 6) + "\n"
    plain = qkv("chat", "--model", str(checkpoint(tmp_path / "plain", "decoder")), "-p", "hi")
    assert plain.returncode == 2 and "no chat template" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1


def read_until(fd: int, text: str, timeout: float = 120.0) -> str:
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen.decode(errors="replace")


def test_interactive_chat_in_a_terminal_answers_and_ends_on_ctrl_d(chat_dir: Path) -> None:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "chat", "--model", str(chat_dir), *GREEDY],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        assert "you> " in read_until(controller, "you> ")
        os.write(controller, b"the fox\n")
        shown = read_until(controller, "you> ")
        assert "assistant> " in shown
        reply = expected_reply(chat_dir, "<|user|>the fox<|assistant|>", 6)
        assert reply.replace("\n", "\r\n") in shown
        os.write(controller, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(controller)


@pytest.mark.slow
def test_chat_refuses_bad_messages_one_line_each_and_goes_on(chat_dir: Path) -> None:
    import subprocess as sp

    script = b"the fox \xff\n" + b"fox " * 60 + b"\nthe fox\n"
    result = sp.run([sys.executable, "-m", "qkv", "chat", "--model", str(chat_dir), *GREEDY],
                    input=script, capture_output=True, timeout=120)  # fmt: skip
    summary, *err = result.stderr.decode().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert summary.startswith("model: qkv decoder, ") and "float32" in summary
    assert err[0] == (
        "qkv chat: error: input line 1 is not UTF-8 text (byte 0xff at offset 8); skipped"
    )
    assert err[1].startswith("qkv chat: error: input line 2: the message needs")
    assert err[1].endswith("shorten it")
    assert err[2] == (
        "qkv chat: error: no reply to input lines 1, 2 (see above); the other lines were answered"
    )
    assert len(err) == 3
    expected = expected_reply(chat_dir, "<|user|>the fox<|assistant|>", 6)
    assert result.stdout.decode() == expected + "\n"
    long = qkv("chat", "--model", str(chat_dir), "-p", "fox " * 60)
    assert long.returncode == 2 and "shorten it" in long.stderr


def test_every_piped_line_gets_its_slot_when_one_is_not_utf8(chat_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "chat", "--model", str(chat_dir), *GREEDY],
        input=b"hello\n\xff\xfe\nbye\n", capture_output=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[1:] == [
        "qkv chat: error: input line 2 is not UTF-8 text (byte 0xff at offset 0); skipped",
        "qkv chat: error: no reply to input line 2 (see above); the other lines were answered",
    ]
    hello = expected_reply(chat_dir, "<|user|>hello<|assistant|>", 6)
    bye = expected_reply(
        chat_dir, f"<|user|>hello<|assistant|>{hello}<|endoftext|><|user|>bye<|assistant|>", 6
    )
    assert result.stdout.decode() == f"{hello}\n{bye}\n"
