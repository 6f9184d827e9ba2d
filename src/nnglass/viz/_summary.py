"""A saved value at a glance: shape, dtype, min/mean/max and a small histogram.

Invariant: the numbers shown are the tensor's own, computed over its finite elements
(NaN and ±inf are counted and named, not folded into the statistics), and the histogram
is inline SVG whose bars carry their bin's range and count (`<title>`, a hover tip), so
nothing is fetched and nothing needs matplotlib. Containers (tuples, lists per
generation step, model outputs) show one entry per element, up to `_ITEMS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..tracing.proxy import NeverRan, Proxy, Saved
from ._html import Html, escape

_BINS = 24
_ITEMS = 16
_DEPTH = 3
_STYLE = """<style>
.nng-value{font-family:var(--jp-code-font-family,monospace);font-size:12px}
.nng-value table{border-collapse:collapse;margin:2px 0}
.nng-value td{padding:0 .8em 0 0;text-align:left}
.nng-value .nng-key{opacity:.65}
.nng-value details>div{margin-left:1.2em}
</style>"""


def value_summary(value: Any, title: str = "saved value") -> Html:
    """HTML summary of a saved value (a `Saved` proxy, a tensor, or a structure of them)."""
    return Html(f'{_STYLE}<div class="nng-value">{_block(value, title, 0)}</div>')


def _block(value: Any, label: str, depth: int) -> str:
    if isinstance(value, Saved):
        value = value._value  # not `.value`: a step that never ran is shown, not raised
    elif isinstance(value, Proxy):
        value = value.value  # raises, saying when the value will exist
    if isinstance(value, NeverRan):
        return f"<div><b>{escape(label)}</b>: never computed (its generation step never ran)</div>"
    if isinstance(value, torch.Tensor):
        return _tensor(value, label)
    items = _items(value)
    if items is None or depth >= _DEPTH:
        text = repr(value)
        text = text if len(text) <= 300 else text[:300] + " …"
        return f"<div><b>{escape(label)}</b>: <code>{escape(text)}</code></div>"
    shown = "".join(_block(v, k, depth + 1) for k, v in items[:_ITEMS])
    more = f"<div>… and {len(items) - _ITEMS} more</div>" if len(items) > _ITEMS else ""
    kind = f"{type(value).__name__} of {len(items)}"
    return (f'<details open><summary><b>{escape(label)}</b>: {escape(kind)}</summary>'
            f"<div>{shown}{more}</div></details>")


def _items(value: Any) -> list[tuple[str, Any]] | None:
    if isinstance(value, Mapping):
        return [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    return None


def stats(t: torch.Tensor) -> dict[str, float | int]:
    """min, mean, max (and std) over the finite elements, and how many are not finite."""
    if t.device.type == "meta" or t.is_complex() or t.numel() == 0:
        return {}
    x = t.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x)
    out: dict[str, float | int] = {"nonfinite": int((~finite).sum())}
    x = x[finite]
    if x.numel():
        out.update(min=float(x.min()), mean=float(x.mean()), max=float(x.max()))
        out["std"] = float(x.std(unbiased=False))
    return out


def _tensor(t: torch.Tensor, label: str) -> str:
    s = stats(t)
    dtype = str(t.dtype).removeprefix("torch.")
    rows = [("shape", str(list(t.shape))), ("dtype", dtype), ("device", str(t.device))]
    for key in ("min", "mean", "max", "std"):
        if key in s:
            rows.append((key, f"{s[key]:.6g}"))
    if s.get("nonfinite"):
        x = t.detach().to("cpu", torch.float64)
        rows.append(("not finite", f"{int(x.isnan().sum())} NaN, {int(x.isinf().sum())} ±inf"))
    if not s and t.device.type == "meta":
        rows.append(("values", "none (a meta tensor: shapes only)"))
    cells = "".join(
        f'<tr><td class="nng-key">{k}</td><td data-stat="{k}">{escape(v)}</td></tr>' for k, v in rows
    )
    chart = _histogram(t) if "min" in s else ""
    return (f'<div><b>{escape(label)}</b><table><tr><td style="vertical-align:top">'
            f"<table>{cells}</table></td><td>{chart}</td></tr></table></div>")


def histogram(t: torch.Tensor, bins: int = _BINS) -> tuple[torch.Tensor, float, float]:
    """(counts over `bins` equal bins from min to max of the finite elements, min, max)."""
    x = t.detach().to("cpu", torch.float64).reshape(-1)
    x = x[torch.isfinite(x)]
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return torch.tensor([x.numel()], dtype=torch.int64), lo, hi
    return torch.histc(x, bins=bins, min=lo, max=hi).to(torch.int64), lo, hi


def _histogram(t: torch.Tensor) -> str:
    counts, lo, hi = histogram(t)
    width, height, n = 168, 44, len(counts)
    bar = width / n
    top = max(int(counts.max()), 1)
    step = (hi - lo) / n
    rects = []
    for i, c in enumerate(counts.tolist()):
        h = height * c / top
        tip = f"{lo + i * step:.4g} to {lo + (i + 1) * step:.4g}: {c}"
        box = f'x="{i * bar:.2f}" y="{height - h:.2f}" width="{max(bar - 1, 1):.2f}" height="{h:.2f}"'
        rects.append(f'<rect {box} fill="#4c78a8" data-count="{c}"><title>{tip}</title></rect>')
    y = height + 11
    axis = (
        f'<text x="0" y="{y}" font-size="9" fill="currentColor">{lo:.3g}</text>'
        f'<text x="{width}" y="{y}" font-size="9" text-anchor="end" fill="currentColor">{hi:.3g}</text>'
    )
    return (f'<svg class="nng-hist" width="{width}" height="{height + 13}" role="img" '
            f'aria-label="histogram of the values">{"".join(rects)}{axis}</svg>')
