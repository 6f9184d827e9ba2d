"""What the plots accept: saved values, plain tensors, nested lists of them, and tokens.

Invariant: every plot sees a detached float32 CPU tensor of the documented rank, or the
caller gets a ValueError naming the shapes it may pass instead. A `Saved` proxy (what
`.save()` gives after the block, locally or once a remote job has delivered) counts as
its value, so `logit_lens(lens)` and `logit_lens([s.value for s in lens])` draw the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..tracing.proxy import Proxy, Saved


def plain(x: Any) -> Any:
    """A saved proxy's value (a proxy still waiting for its value raises its own error)."""
    return x.value if isinstance(x, (Saved, Proxy)) else x


def as_tensor(x: Any, what: str) -> torch.Tensor:
    """`x` (tensor, saved value, number, or a nested sequence of those) as float32 CPU."""
    x = plain(x)
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    if isinstance(x, (int, float)):
        return torch.tensor(float(x))
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0:
        parts = [as_tensor(y, what) for y in x]
        if len({p.shape for p in parts}) != 1:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise ValueError(f"{what}: the parts have different shapes ({shapes}); pass one "
                             "tensor per layer, each of the same shape")
        return torch.stack(parts)
    raise ValueError(f"{what}: expected a tensor, a saved value or a list of them, got {type(x).__name__}")


def drop_batch(x: torch.Tensor, rank: int, batch: int, what: str, shapes: str) -> torch.Tensor:
    """`x` with rank `rank`; one more leading dimension is a batch, of which row `batch`."""
    if x.dim() == rank + 1:
        if not -x.shape[0] <= batch < x.shape[0]:
            raise ValueError(f"{what}: batch row {batch} is out of range for a batch of {x.shape[0]}")
        x = x[batch]
    if x.dim() != rank:
        raise ValueError(f"{what}: got shape {tuple(x.shape)}; expected {shapes}")
    return x


def layers_first(x: Any, rank: int, batch: int, what: str, shapes: str) -> torch.Tensor:
    """Per-layer values → one tensor `[layers, ...]` of rank `rank`: a list of per-layer
    tensors (each maybe with a batch dimension) or one stacked tensor."""
    x = plain(x)
    if isinstance(x, Sequence) and not isinstance(x, str):
        return torch.stack([drop_batch(as_tensor(y, what), rank - 1, batch, what, shapes) for y in x])
    t = as_tensor(x, what)
    if t.dim() == rank + 1:  # [layers, batch, ...]
        t = t[:, batch]
    return drop_batch(t, rank, batch, what, shapes)


def token_text(text: str) -> str:
    """A token as a label: whitespace made visible, so " " and "\\n" are not blank ticks."""
    if text and not text.strip():
        return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    return text.replace("\n", "\\n").replace("\t", "\\t")


def decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id's own text (one `decode` per id, so a token's leading space stays with it);
    "#id" for an id the tokenizer has no text for (e.g. a vocabulary padded for speed)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [token_text(tokenizer.decode([int(i)])) or f"#{int(i)}" for i in ids]


def token_labels(tokens: Any, tokenizer: Any, n: int, what: str) -> list[str]:
    """Tick labels for `n` positions from token strings, token ids or a prompt string.

    A prompt string needs the tokenizer and is tokenized as `LanguageModel` does (no
    padding: one prompt); None gives position numbers.
    """
    tokens = plain(tokens)
    if tokens is None:
        labels = [str(i) for i in range(n)]
    elif isinstance(tokens, str):
        if tokenizer is None:
            raise ValueError(f"{what}: a prompt string needs `tokenizer=`; or pass the token strings")
        labels = decode(tokenizer, tokenizer(tokens)["input_ids"])
    elif isinstance(tokens, torch.Tensor):
        labels = decode(tokenizer, tokens.reshape(-1).tolist())
    elif all(isinstance(t, str) for t in tokens):
        labels = [token_text(t) for t in tokens]
    else:
        labels = decode(tokenizer, [int(t) for t in tokens])
    if len(labels) != n:
        raise ValueError(f"{what}: {len(labels)} tokens for {n} positions; pass one token per "
                         "position (the values' position dimension)")
    return labels


def layer_labels(layers: Sequence[Any] | None, n: int, what: str) -> list[str]:
    if layers is None:
        return [str(i) for i in range(n)]
    if len(layers) != n:
        raise ValueError(f"{what}: {len(layers)} layer labels for {n} layers")
    return [str(x) for x in layers]
