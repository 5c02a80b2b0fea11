"""The walkthrough: a text through a model, stage by stage, every number kept, and the ways it
is shown. One module per concern:

    capture   the stages the model's own modules record in one forward pass (qkv.nn.recording),
              the logit lens, logits and probabilities: explain_text, explain_model, walk
    render    as text, the tables `qkv explain` prints: render_text
    payload   as JSON, what `qkv explain --json` prints and POST /v1/explain returns: payload
    plot      as a figure (`qkv explain --plot`): plot, figure
    budget    an explanation's size from shapes alone, before any work: check_explain_size
    explorer  the explorer page (static/explorer.*), served at / or written with its data
"""

from qkv.explain.capture import (
    MAX_TARGET,
    MAX_WORDS,
    NOTES_SENTENCE,
    Stage,
    Walkthrough,
    explain_checkpoint,
    explain_model,
    explain_text,
    walk,
    word_tokens,
)
from qkv.explain.payload import next_token, payload, render_json
from qkv.explain.plot import figure, plot
from qkv.explain.render import render_text

__all__ = [
    "MAX_TARGET",
    "MAX_WORDS",
    "NOTES_SENTENCE",
    "Stage",
    "Walkthrough",
    "explain_checkpoint",
    "explain_model",
    "explain_text",
    "figure",
    "next_token",
    "payload",
    "plot",
    "render_json",
    "render_text",
    "walk",
    "word_tokens",
]
