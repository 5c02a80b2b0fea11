"""An explanation's cost known before it is computed: the count from shapes on the meta device
equals the numbers the real walkthrough's JSON holds, and a request too big is refused first."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.config import ModelConfig
from qkv.errors import QkvError
from qkv.explain import explain_model, payload
from qkv.explain.budget import MAX_BYTES, MAX_NUMBERS, check_explain_size, explain_cost
from qkv.model import build_model
from qkv.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog"


def numbers_in(value: object) -> int:
    """How many numbers a JSON value holds (ints and floats; not booleans)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return 1
    if isinstance(value, list):
        return sum(numbers_in(v) for v in value)
    return 0


def stage_numbers(data: dict) -> int:
    """The numbers of every stage's values, and of a vocabulary-wide stage's top ids and values:
    what grows with the text, the model and the choices."""
    total = 0
    for stage in data["stages"]:
        total += numbers_in(stage.get("values", []))
        if "top" in stage:
            total += numbers_in(stage["top"]["ids"]) + numbers_in(stage["top"]["values"])
    return total


@pytest.mark.parametrize(
    "preset, changes",
    [("tiny", {}), ("llama-small", {"n_layers": 2}), ("gpt2-small", {"n_layers": 2})],
)
@pytest.mark.parametrize(
    "layers, heads, top", [(None, None, 10), ([1], [0, 2], 5), ([0], None, None)]
)
def test_the_count_is_the_walkthroughs_own(preset, changes, layers, heads, top) -> None:
    tokenizer = Tokenizer.train_char([TEXT])
    config = ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size, **changes)
    torch.manual_seed(0)
    model = build_model(config).eval()
    walkthrough = explain_model(model, tokenizer, TEXT)
    data = json.loads(json.dumps(payload(walkthrough, layers, heads, top)))
    numbers, held = explain_cost(config, len(walkthrough.tokens), layers, heads, top)
    assert numbers == stage_numbers(data)
    recorded = sum(s.values.numel() * 4 for s in walkthrough.stages if s.name != "token_ids")
    assert held >= recorded * 0.9


def test_a_request_too_big_is_refused_before_any_work() -> None:
    gpt2 = ModelConfig.preset("gpt2-small")
    with pytest.raises(QkvError, match=f"limit is {MAX_BYTES / 2**30:.0f} GiB"):
        check_explain_size(gpt2, 512)
    with pytest.raises(QkvError, match=r"fewer `layers`.*fewer `heads`.*smaller `top`"):
        check_explain_size(gpt2, 128, top=10)
    check_explain_size(gpt2, 128, layers=[0], top=10)  # the page's request fits
    assert explain_cost(gpt2, 128, layers=[0], top=10)[0] < MAX_NUMBERS
    with pytest.raises(QkvError, match="layer 12 does not exist"):
        check_explain_size(gpt2, 8, layers=[12])
