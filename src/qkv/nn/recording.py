"""Recording: the modules keep what their forward pass computed, while asked to.

A module that can record is `Recordable`: its class states, in FORMULAS, the formula of every
value it records, next to the code computing it. Its forward pass does `if self.recorder is not
None: self.recorder(name, value)`, so a model that is not recording pays one attribute test per
module. `recording(model)` hands every such module a Recorder for the duration of a `with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn


@dataclass
class Record:
    """One value a module computed: `module` is its name in the model (blocks.0.self_attention),
    `name` the stage (query, attention_weights, ...), `value` the tensor (batch, ...) as computed,
    `formula` the module's statement of it and, for a block's residual sums, `sublayer` the one
    the sum closes (attention, cross_attention, feed_forward)."""

    module: str
    name: str
    value: Tensor
    formula: str
    sublayer: str | None = None


class Recorder:
    """Appends a module's values, with their formulas, to a list shared by the whole model."""

    def __init__(self, module_name: str, module: Recordable, records: list[Record]) -> None:
        self.module_name = module_name
        self.module = module
        self.records = records

    def __call__(self, name: str, value: Tensor, sublayer: str | None = None) -> None:
        """Keep `value` (detached) as stage `name`, with {fields} in its formula filled in."""
        formula = self.module.FORMULAS[name].format_map(vars(self.module))
        self.records.append(Record(self.module_name, name, value.detach(), formula, sublayer))


class Recordable:
    """A module that hands what it computes to `recorder` while one is set (see `recording`)."""

    FORMULAS: ClassVar[dict[str, str]] = {}
    recorder: Recorder | None = None


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[Record]]:
    """`with recording(model) as records:` every Recordable module of `model` appends what it
    computes to `records`, in the order computed; afterwards none records any more."""
    records: list[Record] = []
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Recordable)]
    for name, module in modules:
        module.recorder = Recorder(name, module, records)
    try:
        yield records
    finally:
        for _, module in modules:
            del module.recorder
