"""The live status of a remote job: one line on stderr, rewritten in place with `\\r`;
in a Jupyter notebook, one output cell area updated in place (`NotebookStatus`).

Invariants:
- Shown only when asked (`progress=True`) or, by default, when the stream is a terminal;
  `progress=False` never writes. Logs and piped output stay clean unless asked.
- Each write replaces the whole previous line (padded over it), and `clear()` erases it,
  so once a job is done the terminal looks as it did before.
- Only texts that changed are written (a download updates per 0.1 MB, not per chunk).
"""

from __future__ import annotations

import html
import sys
from collections.abc import Callable, Mapping
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
                 prefix: str = "nnglass") -> None:
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


class NotebookStatus:
    """The same status in a notebook: an HTML line (a progress bar while downloading)
    in one display area, updated in place and emptied when the job is done.
    `display`: IPython's `display` (tests pass their own)."""

    def __init__(self, display: Callable[..., Any], prefix: str = "nnglass") -> None:
        self._display = display
        self.prefix = prefix
        self._handle: Any = None
        self._html = ""

    def _render(self, markup: str) -> None:
        if markup == self._html:
            return
        bundle = {"text/html": markup}
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self._html = markup

    def show(self, text: str) -> None:
        self._render(f"<code>{html.escape(self.prefix)}: {html.escape(text)}</code>")

    def job(self, info: Mapping[str, Any]) -> None:
        self.show(describe(info))

    def download(self, done: int, total: int | None) -> None:
        if not total:
            self.show(bar(done, None))
            return
        self._render(f"<code>{html.escape(self.prefix)}: downloading {done / _MB:.1f}/{total / _MB:.1f} MB"
                     f"</code> <progress value=\"{done}\" max=\"{total}\"></progress>")

    def clear(self) -> None:
        if self._handle is not None:
            self._render("")

    def __enter__(self) -> NotebookStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


Status = StatusLine | NotebookStatus


def status_for(progress: bool | None) -> Status:
    """The status display for a job: in a Jupyter kernel an updating cell output (unless
    `progress=False`); elsewhere the stderr line (by default only on a terminal)."""
    if progress is not False and "ipykernel" in sys.modules:
        try:
            from IPython.display import display
        except ImportError:
            pass
        else:
            return NotebookStatus(display)
    return StatusLine(progress)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
