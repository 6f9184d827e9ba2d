"""Whole tensors on a tensor-parallel model: which hook sites hold only this rank's shard
of a tensor, and the collectives that make it whole for the graph and local again for
the model.

Under transformers' tensor-parallel plan a colwise module (q/k/v, gate/up projections)
outputs the slice of its features this rank holds, so everything between it and the
next rowwise module (the attention's heads, `act_fn`, `o_proj.input`, `down_proj.input`)
is a shard too; a rowwise module all-reduces inside its own forward, so its output hook
already sees the sum. Which sites are shards is measured once, when the sharded model
loads (`SiteLayouts.measure`): one short forward of the sharded model and one of the
full model on the meta device (no weights, no memory) over the same prompt; a tensor at
a module's input or output whose shape differs from the full one in exactly one
dimension is a shard along that dimension (`Cut`).

Invariants:
- Decided per site at load, never per call: a site without cuts (a decoder block's
  output, `mlp.output`, `o_proj.output`, the logits, the embeddings) is whole and costs
  nothing: `whole` and `local` hand the value back untouched, no collective, no copy.
- `whole` gives every rank the same full tensor (one all-gather per cut); `local` gives
  each rank its own slice of a full tensor (no collective). Every rank runs the same
  graph on the same whole values, so every rank makes the same collectives in the same
  order: nothing here branches on the rank except which slice it keeps.
- A setter's whole value is sliced back to this rank's shard before the model sees it,
  so the layer's own collective (the next rowwise all-reduce) reproduces the edit.
- Sharded parameters stay sharded; `param` returns a whole copy (an all-gather).
- Gradients: at a sharded site whose gradient the graph watches, the gather is
  differentiable and the model continues from the whole tensor's slice; the whole
  gradient is every rank's part summed (one all-reduce in backward, made by every rank in
  the same backward order). Where no gradient is watched, nothing of this is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ExecutionError
from .values import replace_at

Site = tuple[str, str]  # (module path, "inputs" | "input" | "output")


@dataclass(frozen=True)
class Cut:
    """One tensor of a site's value that is a shard: where it is (an index path through
    tuples), the sharded dimension (counted from the end) and each rank's length there."""

    leaf: tuple[int, ...]
    dim: int
    sizes: tuple[int, ...]

    @property
    def full(self) -> int:
        return sum(self.sizes)


class _Gather(torch.autograd.Function):
    """All-gather a shard into the whole tensor; backward: this rank's slice of the whole
    gradient (which `_SumGrads` has already made whole on every rank)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, layouts: SiteLayouts, cut: Cut) -> torch.Tensor:
        ctx.layouts, ctx.cut = layouts, cut
        return layouts._gather(t, cut)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.layouts._slice(grad, ctx.cut), None, None


class _SumGrads(torch.autograd.Function):
    """Identity forward; backward: the sum of every rank's gradient (one all-reduce), so a
    whole tensor that each rank's model uses only a slice of gets its whole gradient."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _tensor_at(value: Any, leaf: tuple[int, ...]) -> torch.Tensor | None:
    for i in leaf:
        if not isinstance(value, (tuple, list)) or i >= len(value):
            return None
        value = value[i]
    return value if isinstance(value, torch.Tensor) else None


Leaf = tuple[int, ...]


def _tensor_leaves(value: Any, prefix: Leaf = ()) -> Iterator[tuple[Leaf, torch.Tensor]]:
    """Tensors inside nested tuples and lists, by index path (other containers: whole)."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif type(value) in (tuple, list):
        for i, v in enumerate(value):
            yield from _tensor_leaves(v, (*prefix, i))


class SiteLayouts:
    """The cuts of every sharded site, and the collectives over `group` (None: the
    default process group) that move between shards and whole tensors."""

    def __init__(self, cuts: dict[Site, tuple[Cut, ...]], rank: int, group: Any = None) -> None:
        self.cuts = cuts
        self.rank = rank
        self.group = group

    # --- what the interpreter calls ------------------------------------------------------
    def sharded(self, path: str, kind: str) -> bool:
        return (path, kind) in self.cuts

    def whole(self, path: str, kind: str, value: Any, grad: bool = False) -> Any:
        """The unsharded value of the site (the value itself where the site is whole).
        `grad`: the gradient is watched here, so the gather is differentiable (`_Gather`)."""
        cuts = self.cuts.get((path, kind))
        if cuts is None:
            return value
        for cut in cuts:
            t = _tensor_at(value, cut.leaf)
            if t is not None:
                full = _Gather.apply(t, self, cut) if grad else self._gather(t, cut)
                value = replace_at(value, cut.leaf, full)
        return value

    def local(self, path: str, kind: str, value: Any, grad: bool = False) -> Any:
        """This rank's shard of a whole value of the site (e.g. a setter's). `grad`: the
        model's path goes through `_SumGrads`, so the whole tensor's gradient sums every
        rank's part of it (each rank's backward reaches only its own slice)."""
        cuts = self.cuts.get((path, kind))
        if cuts is None:
            return value
        for cut in cuts:
            t = _tensor_at(value, cut.leaf)
            if t is not None and t.dim() >= -cut.dim and t.shape[cut.dim] == cut.full:
                if grad and t.requires_grad:
                    t = _SumGrads.apply(t, self.group)
                value = replace_at(value, cut.leaf, self._slice(t, cut))
        return value

    def _slice(self, t: torch.Tensor, cut: Cut) -> torch.Tensor:
        start, size = sum(cut.sizes[: self.rank]), cut.sizes[self.rank]
        return t.narrow(cut.dim, start, size).contiguous()

    def param(self, value: torch.Tensor) -> torch.Tensor:
        """A parameter or buffer, whole (a DTensor shard is gathered)."""
        from torch.distributed.tensor import DTensor

        return value.full_tensor() if isinstance(value, DTensor) else value

    def call(self, path: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """A module called by the graph: whole arguments in, its whole output out."""
        args, kwargs = self.local(path, "inputs", (args, kwargs))
        return self.whole(path, "output", module(*args, **kwargs))

    # --- the collective ------------------------------------------------------------------
    def _gather(self, t: torch.Tensor, cut: Cut) -> torch.Tensor:
        import torch.distributed as dist

        local = t.detach().contiguous()
        most = max(cut.sizes)
        if local.shape[cut.dim] < most:  # uneven shards: pad to one size for all_gather
            pad = list(local.shape)
            pad[cut.dim] = most - local.shape[cut.dim]
            local = torch.cat([local, local.new_zeros(pad)], cut.dim)
        parts = [torch.empty_like(local) for _ in cut.sizes]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat([p.narrow(cut.dim, 0, n) for p, n in zip(parts, cut.sizes)], cut.dim)

    # --- measuring -----------------------------------------------------------------------
    @classmethod
    def measure(cls, sharded: torch.nn.Module, full_sites: dict[Site, Any],
                forward: Callable[[torch.nn.Module], Any], rank: int, world: int,
                group: Any = None) -> SiteLayouts:
        """Compare the sharded model's site values in `forward(sharded)` with the full
        model's (`full_sites`: (path, "inputs" | "output") -> value, e.g. from a meta
        forward of the same prompt). Every rank calls this together (one all-gather)."""
        import torch.distributed as dist

        seen = _first_values(sharded, forward)
        found: list[tuple[Site, tuple[int, ...], int, int]] = []  # site, leaf, dim, local size
        for site in sorted(seen):
            mine = dict(_tensor_leaves(seen[site]))
            for leaf, full in _tensor_leaves(full_sites.get(site)):
                t = mine.get(leaf)
                if t is None or t.shape == full.shape or t.dim() != full.dim():
                    continue
                differ = [d for d in range(t.dim()) if t.shape[d] != full.shape[d]]
                if len(differ) != 1:
                    shapes = f"{tuple(t.shape)} of {tuple(full.shape)}"
                    raise ExecutionError(f"`{site[0]}.{site[1]}` is split across ranks in more than one "
                                         f"dimension ({shapes}): not supported")
                found.append((site, leaf, differ[0] - t.dim(), t.shape[differ[0]]))
        count = torch.tensor([len(found)])
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        if len({int(c) for c in counts}) != 1:
            raise ExecutionError("the ranks disagree on which sites are sharded (uneven shards)")
        mine_sizes = torch.tensor([n for *_, n in found], dtype=torch.long)
        sizes = [torch.zeros_like(mine_sizes) for _ in range(world)]
        dist.all_gather(sizes, mine_sizes, group=group)
        cuts: dict[Site, list[Cut]] = {}
        for k, (site, leaf, dim, _) in enumerate(found):
            cuts.setdefault(site, []).append(Cut(leaf, dim, tuple(int(s[k]) for s in sizes)))
            if site[1] == "inputs" and leaf[:2] == (0, 0):  # `.input` is the first positional one
                cuts.setdefault((site[0], "input"), []).append(Cut(leaf[2:], dim, cuts[site][-1].sizes))
        return cls({s: tuple(c) for s, c in cuts.items()}, rank, group)


def _first_values(model: torch.nn.Module, forward: Callable[[torch.nn.Module], Any]) -> dict[Site, Any]:
    """(args, kwargs) and output of each module's first call in `forward(model)`."""
    seen: dict[Site, Any] = {}
    handles = []
    for path, module in model.named_modules():
        def pre(m: Any, args: tuple, kwargs: dict, path: str = path) -> None:
            seen.setdefault((path, "inputs"), (args, kwargs))

        def post(m: Any, args: tuple, output: Any, path: str = path) -> None:
            seen.setdefault((path, "output"), output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            forward(model)
    finally:
        for h in handles:
            h.remove()
    return seen
