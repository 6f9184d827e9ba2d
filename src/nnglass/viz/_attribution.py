"""Per-token attribution: gradient x activation, summed over the hidden dimension.

Invariant: `attribution_scores(grad, activation)[t]` is `(grad[t] * activation[t]).sum()`
in float32, and the plot draws exactly those numbers, one bar per prompt token, in
prompt order, coloured by the same diverging map (centred at zero) as its colourbar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._values import as_tensor, drop_batch, token_labels

_SHAPES = "[positions, hidden] or [batch, positions, hidden]"


def attribution_scores(grad: Any, activation: Any, batch: int = 0) -> torch.Tensor:
    """`[positions]`: gradient x activation summed over the hidden dimension.

    grad: a saved `.grad` of a site (e.g. `lm.model.embed_tokens.output.grad.save()`),
    activation: the same site's saved value; both `[positions, hidden]` or batched.
    """
    g = drop_batch(as_tensor(grad, "attribution"), 2, batch, "attribution (grad)", _SHAPES)
    a = drop_batch(as_tensor(activation, "attribution"), 2, batch, "attribution (activation)", _SHAPES)
    if g.shape != a.shape:
        raise ValueError(f"attribution: grad {tuple(g.shape)} and activation {tuple(a.shape)} differ; "
                         "pass the gradient and the value of the same site")
    return (g * a).sum(dim=-1)


def attribution(
    grad: Any,
    activation: Any,
    tokens: Sequence[str] | Sequence[int] | torch.Tensor | str | None = None,
    tokenizer: Any = None,
    batch: int = 0,
    title: str = "attribution (gradient \u00d7 activation)",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """One bar per prompt token: how much each position's activation pushes the quantity
    that was backpropagated (positive: up, negative: down), to first order."""
    scores = attribution_scores(grad, activation, batch)
    labels = token_labels(tokens, tokenizer, scores.shape[0], "attribution")
    limit = float(scores.abs().max()) if scores.numel() else 0.0
    norm = Normalize(-(limit or 1.0), limit or 1.0)
    mappable = ScalarMappable(norm=norm, cmap=colormaps["RdBu_r"])
    widest = max((len(s) for s in labels), default=1)
    size = figsize or (min(40.0, 2.4 + 0.45 * len(labels) + 0.02 * widest), 3.6 + 0.06 * widest)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    values = scores.tolist()
    ax.bar(range(len(values)), values, color=mappable.to_rgba(values), edgecolor="#555555", linewidth=0.5)
    ax.axhline(0.0, color="#555555", linewidth=0.8)
    rotate = widest > 3
    ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
        fontsize=9,
        parse_math=False,
    )
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("gradient \u00d7 activation")
    ax.set_title(title, parse_math=False)
    fig.colorbar(mappable, ax=ax).set_label("attribution")
    return fig
