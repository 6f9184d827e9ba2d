"""A window: the part of a batched site value that one invoke (or one co-tenant) sees.

A batch of several users' prompts is left-padded to one width; each user's window is its
rows and the last `full - cut` positions of every sequence axis, so the `cut` extra
padding positions the batch added for the others are invisible: shapes, indices from
the left or right, and setters mean what they mean when that user runs alone.

Invariants:
- A window's view is basic indexing of the model's tensor (a view, never a copy), and a
  setter writes only inside the window of a copy of the site value; nothing a graph
  holds reaches outside it (the op registry has no raw-storage ops: graph/ops.py).
- The sequence axes of a tensor are its non-batch axes of size `full`. The server picks
  `full` so that it equals no size the model has on its own (`safe_width`), so an axis of
  that size is always a position axis (hidden states, logits, attention patterns on
  both of their position axes, position ids, masks).
- Tensors whose first axis is not the batch (a rotary table shared by all rows, the
  cache position) are not the batch's data and are seen whole, as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Window(NamedTuple):
    start: int  # first row
    stop: int  # one past the last row
    cut: int = 0  # leading positions of each sequence axis hidden (padding of the others)
    full: int = 0  # the batch's width (the size of a sequence axis)

    def index(self, shape: torch.Size) -> tuple[slice, ...]:
        rows = slice(self.start, self.stop)
        if not self.cut:
            return (rows,)
        keep = slice(self.cut, None)
        return (rows, *(keep if size == self.full else slice(None) for size in shape[1:]))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index(t.shape)]

    def put(self, full: torch.Tensor, part: Any) -> torch.Tensor:
        """A copy of `full` with `part` written into this window (broadcast as `t[i] = v`)."""
        out = full.clone()
        out[self.index(full.shape)] = part
        return out


def model_sizes(model: torch.nn.Module) -> frozenset[int]:
    """Every size the model has whatever the prompt: its weights' and buffers' dimensions
    and the integers of its config (heads, head size, layers, ...)."""
    sizes = {d for t in (*model.parameters(), *model.buffers()) for d in t.shape}
    config = getattr(model, "config", None)
    stack: list[Any] = [config.to_dict()] if hasattr(config, "to_dict") else []
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif type(x) is int:
            sizes.add(x)
    return frozenset(sizes)


def safe_width(width: int, sizes: frozenset[int]) -> int:
    """The smallest width >= `width` that is none of the model's own sizes."""
    while width in sizes:
        width += 1
    return width
