"""What a graph does to memory, from the graph alone: the one analysis that both the
runtime's plan (what to copy, in which order to run edits) and the server's policy (what
counts as a write, which values may be weights) read. Because both read the same answer,
the policy can never allow an edit that the runtime carries out somewhere else.

For every node `i`:
- `roots[i]`: the nodes whose memory the value of `i` may share. A root is a `get` (the
  first `get` of its site: every read of a site shares one memory), a `param`, an `import`,
  or a node whose value is fresh memory (then `roots[i] == {i}`). Views, conversions that
  may return their argument, and containers share the roots of everything they hold.
- `edits[i]`: the roots an in-place op at `i` writes (`x.add_()`, `x[...] = v`,
  `inplace=True` functionals, `out=`, an embedding renormalizing its weight under
  `max_norm`). The runtime refuses the last three; the analysis still counts them, so a
  registry that allows them is still checked correctly.
- `grad_targets[i]` for `grad`/`set_grad` nodes: the `get` whose value the gradient is of
  and the int indices that pick the tensor out of it (`out[0].grad`), or None when the
  target is not a module's `.input`/`.output`.
Sound, not exact: "may share" errs towards more sharing (a spurious alias costs a copy or
a refusal, a missed one would let an edit go unseen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ir import GET, GRAD, PARAM, SET_GRAD, Graph, Node, Ref, Site, _collect_refs
from .ops import VIEW_OPS, is_inplace

_F = "torch.nn.functional."
# Ops whose result may share memory with an argument: views, conversions that return their
# argument when nothing changes, containers, and ops that may return an argument itself.
ALIASING = VIEW_OPS | {
    f"Tensor.{m}" for m in "cpu type_as double half bfloat16 bool int long float contiguous".split()
} | {"builtins.tuple", "builtins.list", "builtins.dict", "builtins.min", "builtins.max", "operator.pos",
     _F + "dropout"}
# torch.nn.functional ops with an `inplace` parameter, and its position.
INPLACE_ARG = {_F + "relu": 1, _F + "selu": 1, _F + "silu": 1, _F + "elu": 2, _F + "leaky_relu": 2,
               _F + "hardtanh": 3, _F + "dropout": 3}

Roots = frozenset[int]
GradTarget = tuple[int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Analysis:
    """By node id (a decoded graph's ids are its positions; a hand-made one's need not be)."""

    roots: dict[int, Roots]
    edits: dict[int, Roots]
    grad_targets: dict[int, GradTarget | None]
    nodes: dict[int, Node]

    def shares_weights(self, i: int) -> bool:
        """May the value of node `i` share memory with a parameter or buffer?"""
        return any(self.nodes[r].op == PARAM for r in self.roots[i])


def writes_in_place(node: Node) -> bool:
    """Does the op at `node` write into its first argument?"""
    op, args, kwargs = node.op, node.args, node.kwargs
    pos = INPLACE_ARG.get(op)
    return (is_inplace(op) or bool(kwargs.get("inplace"))
            or (pos is not None and pos < len(args) and bool(args[pos])))


def analyze(graph: Graph) -> Analysis:
    by_id = {node.id: node for node in graph.nodes}
    roots: dict[int, Roots] = {}
    edits: dict[int, Roots] = {}
    first_get: dict[Site, int] = {}
    grad_targets: dict[int, GradTarget | None] = {}

    def roots_of(value: Any) -> Roots:
        refs: list[int] = []
        _collect_refs(value, refs)
        return frozenset().union(*(roots[r] for r in refs if r in roots))

    for node in graph.nodes:
        i, op, args, kwargs = node.id, node.op, node.args, node.kwargs
        edited: Roots = roots_of(args[:1]) if writes_in_place(node) else frozenset()
        if "out" in kwargs:
            edited |= roots_of(kwargs["out"])
        max_norm = kwargs.get("max_norm", args[3] if len(args) > 3 else None)
        if op == _F + "embedding" and max_norm is not None:
            edited |= roots_of((kwargs.get("weight"), args[1:2]))
        edits[i] = edited
        if op == GET and node.site is not None:
            roots[i] = frozenset([first_get.setdefault(node.site, i)])
        elif edited:
            roots[i] = edited  # an in-place op returns the tensor it edited
        elif op in ALIASING:
            roots[i] = roots_of((args, kwargs)) | {i}
        else:
            roots[i] = frozenset([i])  # fresh memory (a param/import is its own root)
        if op in (GRAD, SET_GRAD):
            grad_targets[i] = grad_target(by_id, node)
    return Analysis(roots, edits, grad_targets, by_id)


def grad_target(nodes: dict[int, Node], node: Node) -> GradTarget | None:
    """The `get` whose (whole-batch) value a `.grad` is of, through int indexing of a tuple
    output (`out[0].grad`); None if the target is anything else."""
    path: list[int] = []
    target = node.args[0] if node.args else None
    while isinstance(target, Ref) and target.id < node.id and target.id in nodes:
        t = nodes[target.id]
        if t.op == GET and t.site is not None:
            return (t.id, tuple(reversed(path))) if t.site.kind in ("input", "output") else None
        if t.op != "operator.getitem" or len(t.args) < 2 or type(t.args[1]) is not int:
            return None
        path.append(t.args[1])
        target = t.args[0]
    return None
