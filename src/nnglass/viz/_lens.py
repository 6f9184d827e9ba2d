"""Logit lens: what each layer's residual stream would predict, read through the unembedding.

Invariant: the colour of cell (layer, position) is the softmax probability of that
cell's most likely token, and its text is that token (then the next `top_k - 1`, one per
line), both computed from the logits given, over the whole vocabulary, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._heatmap import heatmap
from ._values import decode, layer_labels, layers_first, token_labels

_SHAPES = ("a list with one [positions, vocab] (or [batch, positions, vocab]) tensor per "
           "layer, or one [layers, positions, vocab] tensor")


def top_tokens(logits: Any, k: int = 1, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids), each `[layers, positions, k]`: the k most likely tokens
    of each layer's logits at each position, most likely first.

    logits: what `[lm.lm_head(lm.model.norm(lm.model.layers[i].output)).save() for i in
    ...]` gives (saved values or tensors), or one stacked `[layers, positions, vocab]`.
    """
    x = layers_first(logits, 3, batch, "top_tokens", _SHAPES)
    return torch.softmax(x, dim=-1).topk(k, dim=-1)


def logit_lens(
    logits: Any,
    tokenizer: Any = None,
    tokens: Sequence[str] | Sequence[int] | torch.Tensor | str | None = None,
    layers: Sequence[int | str] | None = None,
    top_k: int = 1,
    batch: int = 0,
    title: str = "logit lens",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Layers x positions heatmap: colour is the top token's probability, text the token.

    tokenizer decodes the top tokens (without one, cells show token ids) and, given a
    prompt string as `tokens`, tokenizes it for the x axis. tokens: the prompt's token
    strings or ids (default: position numbers). layers: y labels (default 0, 1, ...),
    drawn bottom to top. batch: which row of batched values to draw.
    """
    probs, ids = top_tokens(logits, top_k, batch)
    n_layers, n_positions, _ = probs.shape
    text = [["\n".join(decode(tokenizer, ids[i, j].tolist())) for j in range(n_positions)]
            for i in range(n_layers)]
    return heatmap(
        probs[..., 0].numpy(),
        xlabels=token_labels(tokens, tokenizer, n_positions, "logit_lens"),
        ylabels=layer_labels(layers, n_layers, "logit_lens"),
        xlabel="position (input token)",
        ylabel="layer",
        title=title,
        cmap="Blues",
        norm=Normalize(0.0, 1.0),
        colorbar_label="probability of the top token",
        cell_text=text,
        lower=True,
        figsize=figsize,
    )
