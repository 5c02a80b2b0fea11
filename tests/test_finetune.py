"""Fine-tuning data: JSONL examples, the chat template, response-only loss, vocabulary growth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch

from qkv.chat_template import ROLE_TOKENS, add_chat_tokens, grow_vocabulary
from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.evaluation import IGNORE, next_token_loss
from qkv.finetune import Example, collate, encode_example, read_examples
from qkv.model import DecoderLM
from qkv.tokenizer import Tokenizer

TEXT = "What does json.dumps do? Serialize obj to a JSON formatted str. Hello there!"


@pytest.fixture()
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.train_char([TEXT])
    add_chat_tokens(tokenizer)
    return tokenizer


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_both_formats_read_as_turns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "What?", "response": "That."},
            {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
        ],
    )  # fmt: skip
    assert read_examples(path) == [
        Example((("user", "What?"), ("assistant", "That."))),
        Example((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", ', "line 2: not valid JSON"),
        ('{"prompt": "a"}', "line 2: expected"),
        ('{"prompt": 1, "response": "b"}', "line 2: \"prompt\" and \"response\" must be strings"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: each message needs"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "line 2: the messages have no"),
    ],
)  # fmt: skip
def test_malformed_lines_are_named_by_file_and_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(QkvError, match=message) as error:
        read_examples(path)
    assert str(path) in str(error.value)


def test_template_marks_only_replies_and_their_end_as_targets(tokenizer: Tokenizer) -> None:
    example = Example((("user", "What does json.dumps do?"), ("assistant", "Serialize obj.")))
    ids, target = encode_example(example, tokenizer)
    assert tokenizer.decode(ids) == (
        f"{ROLE_TOKENS['user']}What does json.dumps do?{ROLE_TOKENS['assistant']}"
        "Serialize obj.<|endoftext|>"
    )
    targets = [i for i, t in zip(ids, target, strict=True) if t]
    assert tokenizer.decode(targets) == "Serialize obj.<|endoftext|>"


def test_changing_prompt_labels_never_changes_the_loss_but_response_labels_do(
    tokenizer: Tokenizer,
) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4))
    example = Example((("user", "Hello there!"), ("assistant", "What does json.dumps do?")))
    ids, target = encode_example(example, tokenizer)
    x, y = collate([(ids, target)], tokenizer.pad_id)
    logits = model(x)
    loss = next_token_loss(logits, y)
    generator = torch.Generator().manual_seed(1)
    for position in range(1, len(ids)):
        labels = list(ids)
        labels[position] = (
            labels[position] + 1 + int(torch.randint(0, 5, (), generator=generator))
        ) % tokenizer.vocab_size
        changed = next_token_loss(logits, collate([(labels, target)], tokenizer.pad_id)[1])
        if target[position]:
            assert changed != loss
        else:
            assert changed == loss


def test_growing_the_vocabulary_keeps_the_old_tokens_logits() -> None:
    tokenizer = Tokenizer.train_char(["the user asked, the assistant answered"])
    old = tokenizer.vocab_size
    for tied in (True, False):
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig(vocab_size=old, d_model=16, n_heads=2, tie_embeddings=tied))
        ids = torch.randint(0, old, (2, 9))
        before = model(ids)
        grown = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer.to_str()))
        add_chat_tokens(grown)
        grow_vocabulary(model, grown)
        after = model(ids)
        assert model.config.vocab_size == old + 3 and after.shape[-1] == old + 3
        torch.testing.assert_close(after[..., :old], before)
        table = model.embedder.token_embedding.weight
        for offset, word in enumerate(["system", "user", "assistant"]):
            spelled = table[tokenizer.encode(word)].mean(0)
            torch.testing.assert_close(table[old + offset], spelled)


def test_stdlib_qa_answers_with_the_first_paragraph_and_splits_by_package() -> None:
    import inspect
    import json as json_module

    from qkv.finetune import stdlib_qa

    train, val = stdlib_qa()
    assert len(train) > 3000 and len(val) > 50
    answers = {ex.turns[0][1]: ex.turns[1][1] for ex in train + val}
    first_paragraph = inspect.getdoc(json_module.dumps).split("\n\n")[0]
    assert answers["What does json.dumps do?"] == " ".join(first_paragraph.split())

    def packages(examples: list[Example]) -> set[str]:
        questions = (
            ex.turns[0][1].removeprefix("What does ").removesuffix(" do?") for ex in examples
        )
        return {question.split(".")[0] for question in questions}

    assert not packages(train) & packages(val)


WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike"]


def reversal_examples() -> list[Example]:
    """A task to learn: "reverse alpha" -> "ahpla"."""
    return [Example((("user", f"reverse {w}"), ("assistant", w[::-1]))) for w in WORDS * 3]


def finetune_run(tmp_path: Path, name: str, steps: int = 8, **changes):
    from qkv.config import TrainConfig
    from qkv.finetune import finetune_trainer, prepare_examples

    tokenizer = Tokenizer.train_char(["reverse " + " ".join(WORDS + [w[::-1] for w in WORDS])])
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    model = DecoderLM(
        ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                    max_seq_len=32)
    )  # fmt: skip
    data = prepare_examples(reversal_examples(), tokenizer, context=32)
    cfg = TrainConfig(
        steps=steps, batch_size=8, context=32, lr=3e-3, warmup_steps=2, eval_every=steps,
        save_every=4, seed=0, **changes,
    )  # fmt: skip
    return finetune_trainer(model, tokenizer, data, data, cfg, tmp_path / name)


def test_collated_targets_are_the_next_response_tokens_only(tokenizer: Tokenizer) -> None:
    ids, target = encode_example(Example((("user", "Hi"), ("assistant", "Hello"))), tokenizer)
    x, y = collate([(ids, target), (ids[:4], target[:4])], tokenizer.pad_id)
    assert x[0].tolist() == ids[:-1]
    assert tokenizer.decode([t for t in y[0].tolist() if t != IGNORE]) == "Hello<|endoftext|>"
    assert x[1, 3:].eq(tokenizer.pad_id).all() and y[1, 3:].eq(IGNORE).all()


def test_finetuning_lowers_the_response_loss(tmp_path: Path) -> None:
    trainer = finetune_run(tmp_path, "run", steps=60)
    before = trainer.evaluate().loss
    trainer.run()
    after = [h["val_loss"] for h in trainer.history if "val_loss" in h][-1]
    assert after < 0.7 * before


def test_finetuning_resumes_exactly(tmp_path: Path) -> None:
    straight = finetune_run(tmp_path, "straight")
    straight.run()
    first_half = finetune_run(tmp_path, "halves")

    def stop_after_four(info) -> None:
        if info.step == 4:
            first_half._stop_requested = True

    first_half.on_step = stop_after_four
    with pytest.raises(KeyboardInterrupt):
        first_half.run()
    resumed = finetune_run(tmp_path, "halves")
    resumed.resume(tmp_path / "halves" / "latest")
    resumed.run()
    keys = ("step", "loss", "lr", "grad_norm")  # not tokens/s: that is the machine's
    runs = (resumed, straight)
    records = [[[h[k] for k in keys] for h in t.history if "loss" in h] for t in runs]
    assert records[0] == records[1]
