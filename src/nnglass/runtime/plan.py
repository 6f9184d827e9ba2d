"""A Plan: what the interpreter needs to know about a graph before the model runs.

Computed once per graph, from the graph alone (no model): the dependency counts and
consumers that drive dataflow execution, which sites each hook serves, which site
values must be copied before an in-place edit, and where gradients are requested.

In-place edits keep PyTorch semantics on graph-owned memory only:
- an in-place op whose target is (a view of) a site value makes that site copy its
  value before any node reads it; the edited copy is what the model continues with;
- it runs after every earlier node that reads the same memory (program order), and it
  must finish inside the hook of the site it edits (else it would edit too late);
- parameters are never edited (an in-place op on a `param` value is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import GraphError
from ..graph.ir import ALL_STEPS, GET, GRAD, OPCODES, PARAM, SET, SET_GRAD, Graph, Node, Ref
from ..graph.ops import VIEW_OPS, OpRegistry, is_inplace

SiteKey = tuple[str, str, int, int]  # path, kind, call, step


@dataclass
class Plan:
    graph: Graph
    deps: list[tuple[int, ...]]
    consumers: list[list[int]]
    fns: list[Any]  # registry callable per node (None for opcodes)
    sites: dict[SiteKey, list[int]]  # get/set nodes per site, program order
    hooked: dict[str, set[str]]  # module path -> kinds to hook
    site_where: dict[str, str]  # module path -> the user's line that first touches it
    copy_sites: set[SiteKey]  # sites whose value is copied before in-place edits
    inplace_at: dict[SiteKey, list[int]]  # in-place nodes that must finish in that site's hook
    grad_groups: dict[int, list[int]]  # get-node id -> grad/set_grad nodes (program order)
    grad_path: dict[int, tuple[int, tuple[int, ...]]]  # grad node -> (get node, index path)
    starters: list[int]  # non-site nodes with no dependencies
    all_steps: list[int] = field(default_factory=list)  # nodes run at every step
    has_backward: bool = False
    max_step: int = 0


def site_key(node: Node) -> SiteKey:
    s = node.site
    assert s is not None
    return (s.path, s.kind, s.call, s.step)


def build_plan(graph: Graph, registry: OpRegistry) -> Plan:
    nodes = graph.nodes
    n = len(nodes)
    deps: list[set[int]] = [set(node.refs()) for node in nodes]
    fns: list[Any] = [None] * n
    sites: dict[SiteKey, list[int]] = {}
    hooked: dict[str, set[str]] = {}
    site_where: dict[str, str] = {}
    root: list[int] = list(range(n))  # alias root: the node whose memory a value shares
    readers: dict[int, list[int]] = {}  # alias root -> nodes that read it
    copy_sites: set[SiteKey] = set()
    inplace_at: dict[SiteKey, list[int]] = {}
    grad_groups: dict[int, list[int]] = {}
    grad_path: dict[int, tuple[int, tuple[int, ...]]] = {}
    all_steps: list[int] = []
    max_step = 0
    first_get: dict[SiteKey, int] = {}

    for node in nodes:
        i = node.id
        if node.step == ALL_STEPS:
            all_steps.append(i)
        else:
            max_step = max(max_step, node.step)
        op = node.op
        if op not in OPCODES:
            if op not in registry:
                raise GraphError(f"node %{i}: op {op!r} is not in this registry", node.where)
            fns[i] = registry[op]
        if op in (GET, SET):
            key = site_key(node)
            sites.setdefault(key, []).append(i)
            if node.site.kind != "result":
                hooked.setdefault(node.site.path, set()).add(node.site.kind)
                site_where.setdefault(node.site.path, node.where)
            if op == GET:
                # Every get of one site shares one memory: the site's (possibly copied) value.
                root[i] = first_get.setdefault(key, i)
        elif op in VIEW_OPS and node.args and isinstance(node.args[0], Ref):
            root[i] = root[node.args[0].id]
        for d in deps[i]:
            readers.setdefault(root[d], []).append(i)
        if is_inplace(op) and node.args and isinstance(node.args[0], Ref):
            r = root[node.args[0].id]
            target = nodes[r]
            if target.op == PARAM:
                raise GraphError(
                    "parameters are read-only: clone the weight first (w = ...weight.clone())",
                    node.where,
                )
            # Run after every earlier reader of the same memory (program order).
            deps[i].update(j for j in readers.get(r, ()) if j < i)
            if target.op == GET:
                key = site_key(target)
                copy_sites.add(key)
                inplace_at.setdefault(key, []).append(i)
            readers.setdefault(r, []).append(i)
        if op in (GRAD, SET_GRAD):
            grad_path[i] = _grad_target(graph, node)
            grad_groups.setdefault(grad_path[i][0], []).append(i)
            # The gradient arrives from backward: the target's value is not an input.
            deps[i].discard(node.args[0].id)

    consumers: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            consumers[d].append(i)
    for c in consumers:
        c.sort()
    starters = [
        i for i, node in enumerate(nodes)
        if not deps[i] and node.op not in (GET, SET, GRAD, SET_GRAD)
    ]  # fmt: skip
    return Plan(
        graph, [tuple(sorted(d)) for d in deps], consumers, fns, sites, hooked, site_where, copy_sites,
        inplace_at, grad_groups, grad_path, starters, all_steps,
        has_backward=any(node.op == "backward" for node in nodes), max_step=max_step,
    )  # fmt: skip


def _grad_target(graph: Graph, node: Node) -> tuple[int, tuple[int, ...]]:
    """The get node whose (full-batch) value the gradient is taken of, and the int
    indices that pick the tensor out of it (e.g. `out[0].grad` of a tuple output)."""
    path: list[int] = []
    target = node.args[0]
    while isinstance(target, Ref):
        t = graph.nodes[target.id]
        if t.op == GET:
            if t.site.kind not in ("input", "output"):
                break
            return t.id, tuple(reversed(path))
        if t.op == "operator.getitem" and isinstance(t.args[1], int):
            path.append(t.args[1])
            target = t.args[0]
            continue
        break
    raise GraphError(
        "`.grad` is available on a module's `.input`/`.output` (or an element of a tuple "
        "output, `out[0].grad`); take the gradient first, then index it: `out.grad[:, -1]`",
        node.where,
    )
