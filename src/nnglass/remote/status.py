"""The live status line of a remote job: one line on stderr, rewritten in place with `\\r`.

Invariants:
- Shown only when asked (`progress=True`) or, by default, when the stream is a terminal;
  `progress=False` never writes. Logs and piped output stay clean unless asked.
- Each write replaces the whole previous line (padded over it), and `clear()` erases it,
  so once a job is done the terminal looks as it did before.
- Only texts that changed are written (a download updates per 0.1 MB, not per chunk).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

_MB = 1e6


def describe(info: Mapping[str, Any]) -> str:
    """A job status object (as the server sends it) in words: "queued (position 3)"."""
    status = str(info.get("status", "")).lower()
    if status == "queued" and info.get("position") is not None:
        return f"queued (position {info['position']})"
    return status


def bar(done: int, total: int | None, width: int = 20) -> str:
    """"downloading 12.3/40.0 MB [#####     ]"; without a known total, just the amount."""
    if not total:
        return f"downloading {done / _MB:.1f} MB"
    filled = min(width, int(width * done / total))
    return f"downloading {done / _MB:.1f}/{total / _MB:.1f} MB [{'#' * filled}{' ' * (width - filled)}]"


class StatusLine:
    """One rewritable line. `enabled=None`: on when the stream is a terminal."""

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None,
                 prefix: str = "nnglass") -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.prefix = prefix
        self._text = ""
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled or text == self._text:
            return
        line = f"{self.prefix}: {text}" if self.prefix else text
        self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
        self.stream.flush()
        self._text, self._width = text, len(line)

    def job(self, info: Mapping[str, Any]) -> None:
        self.show(describe(info))

    def download(self, done: int, total: int | None) -> None:
        self.show(bar(done, total))

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._text, self._width = "", 0

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
