"""Which sites of a model are its weights in disguise: lookups of the embedding matrix.

An embedding's output for token id t is row t of the embedding matrix, so reading that
site over every token id copies the matrix exactly (and with tied embeddings, lm_head
too). The same holds for everything computed from one token alone, before any module
mixes positions: the first block's input, its input norm, the first attention's q/k/v
projections, the rotary embeddings (a lookup of a buffer). Under `weights_visible =
false` these sites are refused unless the policy sets `expose_embeddings = true`.

Invariant: the set is found by measuring, not by module names or classes. Two forward
passes whose prompts differ only in the first token; a site whose floating-point values
at every later position are identical in both is a per-token function of the weights (a
lookup site). The first module that mixes positions (attention) breaks the identity,
and so does everything after it. Integer tensors (token ids, positions) are the user's
own data and are never lookups.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..models.source_notes import operation_paths
from ..runtime.values import tensor_leaves
from .config import Policy

_WIDTH = 6  # prompt length of the probe: position 0 differs, positions 1.. are compared


def lookup_sites(model: torch.nn.Module) -> frozenset[tuple[str, str]]:
    """(module path, "input" | "output") of every site whose value is a lookup of weights."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        return frozenset()
    rest = [(7 * i + 3) % vocab for i in range(1, _WIDTH)]
    first = _probe(model, torch.tensor([[1 % vocab, *rest]]))
    second = _probe(model, torch.tensor([[2 % vocab, *rest]]))
    return frozenset(site for site, value in first.items()
                     if site in second and _same_after_first(value, second[site]))


def operation_sites(model: torch.nn.Module) -> list[str]:
    """The `.source` path of every operation inside a module's forward (graph/source.py)
    that one forward pass makes: a graph may name only these. Measured on the loaded model,
    so the attention implementation it was loaded with decides (eager: softmax, sdpa: the
    fused call)."""
    vocab = max(int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0), 2)
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(_WIDTH)]])
    return operation_paths(model, lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                use_cache=False))


def _probe(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[str, str], Any]:
    """Every module's first input and first output during one forward pass over `ids`."""
    seen: dict[tuple[str, str], Any] = {}
    handles = []

    def record(path: str, kind: str, value: Any) -> None:
        seen.setdefault((path, kind), value)

    for path, module in model.named_modules():
        params = list(inspect.signature(module.forward).parameters)

        def pre(module: torch.nn.Module, args: tuple, kwargs: dict, path: str = path,
                params: list[str] = params) -> None:
            # What `.input` reads: the first positional argument, else the first forward
            # parameter passed by keyword.
            name = next((p for p in params if p in kwargs), None)
            record(path, "input", args[0] if args else None if name is None else kwargs[name])

        def post(module: torch.nn.Module, args: tuple, output: Any, path: str = path) -> None:
            record(path, "output", output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _same_after_first(a: Any, b: Any) -> bool:
    """Both hold floating-point tensors, equal at every position after the first."""
    xs = [t for t in tensor_leaves(a) if t.is_floating_point()]
    ys = [t for t in tensor_leaves(b) if t.is_floating_point()]
    if not xs or len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            return False
        if x.dim() >= 2 and x.shape[1] == _WIDTH:
            x, y = x[:, 1:], y[:, 1:]
        if not torch.equal(x, y):
            return False
    return True


def describe(policy: Policy, lookups: frozenset[tuple[str, str]] | None) -> dict[str, Any]:
    """For `/v1/models`: which sites reveal what, and whether this policy lets them be read."""
    hidden = not (policy.weights_visible or policy.expose_embeddings)
    return {
        "lookup_sites": None if lookups is None else [f"{p or '<root>'}.{k}" for p, k in sorted(lookups)],
        "lookup_sites_readable": not hidden,
        "reveals": "each lookup site's value is a per-token function of the weights (rows of the embedding "
                   "matrix, its norm and projections, the rotary tables): read over every token id it "
                   "copies them exactly",
        "inputs_show": "only `.input` (other arguments are opaque)" if not policy.weights_visible
                       else "every argument that is a value (model state such as KV caches is opaque)",
    }
