"""Attention pattern of one head: which earlier tokens each query token attends to.

Invariant: row q, column k of the image is the given probability that query q attends
to key k; with `causal=True` (the default) the cells k > q are masked rather than drawn
as zeros, so the triangle reads as "cannot attend", not as "chose not to".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._heatmap import heatmap
from ._values import as_tensor, drop_batch, token_labels

_SHAPES = "[heads, queries, keys] or [batch, heads, queries, keys] (e.g. attention weights)"


def attention_pattern(
    probs: Any,
    head: int,
    tokens: Sequence[str] | Sequence[int] | torch.Tensor | str | None = None,
    tokenizer: Any = None,
    batch: int = 0,
    causal: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Query x key heatmap of head `head`'s attention probabilities (0 to 1).

    probs: attention weights, e.g. `lm.model.layers[i].self_attn.source.softmax_0.output`
    saved under eager attention, an eager attention module's `.output[1]`, or
    `lm.output.attentions[layer]` with `output_attentions=True`.
    """
    x = drop_batch(as_tensor(probs, "attention_pattern"), 3, batch, "attention_pattern", _SHAPES)
    if not -x.shape[0] <= head < x.shape[0]:
        raise ValueError(f"attention_pattern: head {head} is out of range for {x.shape[0]} heads")
    head %= x.shape[0]
    pattern = x[head]
    n_queries, n_keys = pattern.shape
    data: np.ndarray = pattern.numpy()
    if causal:
        # Keys after the query; with a KV cache the queries are the last n_queries keys.
        future = np.triu(np.ones((n_queries, n_keys), dtype=bool), k=1 + n_keys - n_queries)
        data = np.ma.masked_array(data, mask=future)
    labels = token_labels(tokens, tokenizer, n_keys, "attention_pattern")
    return heatmap(
        data,
        xlabels=labels,
        ylabels=labels[n_keys - n_queries :],
        xlabel="key (attended to)",
        ylabel="query (attending)",
        title=title or f"attention, head {head}",
        cmap="Blues",
        norm=Normalize(0.0, 1.0),
        colorbar_label="attention probability",
        figsize=figsize,
    )
