"""The explorer page: one HTML file (static/explorer.html, .css and .js inlined) that shows
what POST /v1/explain returns, panel by panel. Served at / by `qkv serve` and `qkv explore`;
`qkv explain --html FILE` writes it with the data embedded, to open offline.

No build step and no library: the page is plain HTML, CSS and JavaScript shipped in the package.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from qkv.files import atomic_write_text


def page(settings: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """The page, with `settings` ({"api": True when a server answers, "model", "notes", "text"})
    and, for a file to open offline, the explain `data` embedded."""
    static = resources.files("qkv") / "static"
    html = (static / "explorer.html").read_text(encoding="utf-8")
    parts = {
        "{{CSS}}": (static / "explorer.css").read_text(encoding="utf-8"),
        "{{JS}}": (static / "explorer.js").read_text(encoding="utf-8"),
        "{{SETTINGS}}": _script_json(settings),
        "{{DATA}}": _script_json(data),
    }
    return re.sub(r"\{\{[A-Z]+\}\}", lambda m: parts[m.group()], html)  # one pass: none re-read


def write_html(data: dict[str, Any], text: str, path: str | Path) -> Path:
    """`qkv explain --html`: the page with `data` (payload of `text`) embedded, written
    atomically; it needs no server and opens offline."""
    path = Path(path)
    settings = {"api": False, "model": None, "notes": bool(data.get("untrained")), "text": text,
                "chat": False, "sample": False}  # fmt: skip
    atomic_write_text(path, page(settings, data | {"text": text}))
    return path


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element: every '<' spelled \\u003c, so no '</script>' or
    '<!--' in a token's text can end or change it."""
    return json.dumps(value, allow_nan=False).replace("<", "\\u003c")
