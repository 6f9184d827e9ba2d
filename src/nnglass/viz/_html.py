"""HTML for notebooks: a value Jupyter renders, and escaping.

Invariant: every string from a model or a value (module names, class names, reprs) goes
through `escape` before it reaches HTML, and the HTML is self-contained (inline CSS and
SVG, no scripts, no external assets), so it renders the same offline and in exported
notebooks.
"""

from __future__ import annotations

import html


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


class Html:
    """HTML text: Jupyter renders it (`_repr_html_`), `str()` gives the markup."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def _repr_html_(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"<Html: {len(self.text)} characters; display it in a notebook, or str() it>"


def count(n: int) -> str:
    """1234 → "1.2K", 134_515_008 → "134.5M" (parameter counts at a glance)."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
