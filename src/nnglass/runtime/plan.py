"""A Plan: what the interpreter needs to know about a graph before the model runs.

Computed once per graph, from the graph alone (no model): the dependency counts and
consumers that drive dataflow execution, which sites each hook serves, which site
values must be copied before an in-place edit, and where gradients are requested. What
shares memory with what, and what an op edits, comes from `graph.analysis` (the same
answer the server's policy reads).

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
from ..graph.analysis import Analysis, analyze
from ..graph.ir import (
    ALL_STEPS,
    GET,
    GRAD,
    OPCODES,
    PARAM,
    SET,
    SET_GRAD,
    TRACE,
    Graph,
    Node,
    Ref,
    _collect_refs,
)
from ..graph.ops import REGISTRY, OpRegistry
from ..graph.source import split as split_source

SiteKey = tuple[str, str, int, int]  # path, kind, call, step
_SITE_OPS = frozenset({GET, SET, GRAD, SET_GRAD})


@dataclass(slots=True)
class SiteTask:
    """What a hook does when its site fires."""

    ids: list[int]  # get/set nodes, program order
    copy: bool = False  # copy the value first: in-place edits of it follow
    inplace: list[int] = field(default_factory=list)  # must be done when the hook returns
    grads: list[int] = field(default_factory=list)  # get nodes whose gradient is watched
    first_get: int = -1  # every get of a site shares one memory, rooted here
    rooted: list[int] = field(default_factory=list)  # nodes whose value is (a view of) it
    escapes: list[int] = field(default_factory=list)  # rooted nodes that other nodes read
    last_set: int = -1  # the last `set` among ids (model errors point at it)
    skips: list[int] = field(default_factory=list)  # `module.skip(v)` sets: the forward need not run

    def merged(self, every: SiteTask) -> SiteTask:
        """This step's task and the site's every-step (`tracer.all()`) task, as one."""
        return SiteTask(
            sorted(self.ids + every.ids), self.copy or every.copy, self.inplace + every.inplace,
            self.grads + every.grads, min(self.first_get, every.first_get), self.rooted + every.rooted,
            self.escapes + every.escapes, max(self.last_set, every.last_set), self.skips + every.skips)


@dataclass
class Plan:
    deps: list[tuple[int, ...]]
    consumers: list[list[int]]
    fns: list[Any]  # registry callable per node (None for opcodes)
    tasks: dict[SiteKey, SiteTask]
    hooked: dict[str, set[str]]  # module path -> kinds to hook
    site_where: dict[str, str]  # module path -> the user's line that first touches it
    hook_specs: list[tuple[str, frozenset[str], bool]]  # (path, input kinds, has output) to hook
    grad_groups: dict[int, list[int]]  # get-node id -> grad/set_grad nodes (program order)
    grad_path: dict[int, tuple[int, tuple[int, ...]]]  # grad node -> (get node, index path)
    starters: list[int]  # non-site nodes with no dependencies
    runnable: list[bool]  # runs as soon as its inputs are ready (not a site/grad node)
    all_steps: list[int] = field(default_factory=list)  # nodes run at every step
    final: set[int] = field(default_factory=set)  # saved values nothing can edit later: no copy
    weights: set[int] = field(default_factory=set)  # values that may share a parameter's memory
    has_backward: bool = False
    max_step: int = 0
    skipped: set[str] = field(default_factory=set)  # paths some `.skip(v)` may keep from running
    # `.source` sites (runtime/source.py): module path -> op name ("softmax_0") -> kinds
    source_specs: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)


def site_key(node: Node) -> SiteKey:
    assert node.site is not None
    return node.site  # a Site is a (path, kind, call, step) tuple


def _refs(node: Node) -> set[int]:
    out: set[int] = set()
    for a in node.args:
        if type(a) is Ref:
            out.add(a.id)
        elif type(a) in (tuple, list, dict, slice):
            out.update(_nested_refs(a))
    if node.kwargs:
        out.update(_nested_refs(node.kwargs))
    return out


def _nested_refs(x: Any) -> list[int]:
    out: list[int] = []
    _collect_refs(x, out)
    return out


def build_plan(graph: Graph, registry: OpRegistry) -> Plan:
    nodes = graph.nodes
    n = len(nodes)
    memory = analyze(graph)
    deps: list[set[int]] = [_refs(node) for node in nodes]
    fns: list[Any] = [None] * n
    tasks: dict[SiteKey, SiteTask] = {}
    hooked: dict[str, set[str]] = {}
    site_where: dict[str, str] = {}
    readers: dict[int, list[int]] = {}  # alias root -> nodes that read it
    grad_groups: dict[int, list[int]] = {}
    grad_path: dict[int, tuple[int, tuple[int, ...]]] = {}
    all_steps: list[int] = []
    max_step = 0
    has_backward = False

    for node in nodes:
        i, op = node.id, node.op
        if node.step:
            if node.step == ALL_STEPS:
                all_steps.append(i)
            elif node.step > max_step:
                max_step = node.step
        if op in OPCODES:
            if op == GET or op == SET:
                site = key = node.site
                task = tasks.get(key)
                if task is None:
                    task = tasks[key] = SiteTask([])
                    if site.kind != "result":
                        hooked.setdefault(site.path, set()).add(site.kind)
                        site_where.setdefault(site.path, node.where)
                task.ids.append(i)
                if op == SET and node.kwargs.get("skip") is True:
                    task.skips.append(i)
                if op == GET and task.first_get < 0:
                    task.first_get = i
            elif op == GRAD or op == SET_GRAD:
                grad_path[i] = _grad_target(memory, node)
                grad_groups.setdefault(grad_path[i][0], []).append(i)
                # The gradient arrives from backward: the target's value is not an input.
                deps[i].discard(node.args[0].id)
            elif op == "backward":
                has_backward = True
        else:
            fn = registry.get(op)
            if fn is None:
                raise GraphError(f"node %{i}: op {op!r} is not in this registry", node.where)
            fns[i] = fn
        for d in deps[i]:
            for r in memory.roots[d]:
                readers.setdefault(r, []).append(i)
        if memory.edits[i]:
            _order_inplace(nodes, node, memory, readers, deps, tasks)

    consumers: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            consumers[d].append(i)
    runnable = [node.op not in _SITE_OPS for node in nodes]
    starters = [i for i in range(n) if runnable[i] and not deps[i]]
    for i in range(n):
        for r in memory.roots[i]:
            if nodes[r].op == GET:
                task = tasks[site_key(nodes[r])]
                task.rooted.append(i)
                if consumers[i]:
                    task.escapes.append(i)
    for task in tasks.values():
        task.last_set = max((i for i in task.ids if nodes[i].op == SET), default=-1)
    # The root's output in a plain trace is final: no module runs after it, and no node
    # edits it (else its task would copy). Saving it (or a view of it) needs no copy.
    root_out = [t for k, t in tasks.items() if k[:2] == ("", "output")]
    final = {i for t in root_out if not t.copy for i in t.rooted} if graph.mode == TRACE else set()
    for get_id in grad_groups:
        g = nodes[get_id]
        tasks[site_key(g)].grads.append(get_id)
    hook_specs, source_specs = [], {}
    for path, kinds in hooked.items():
        op = split_source(path)
        if op is None:
            hook_specs.append((path, frozenset(kinds & {"input", "inputs"}), "output" in kinds))
        else:  # an operation inside the module's forward: its module's hooks count the calls
            source_specs.setdefault(op.module, {})[op.name] = frozenset(kinds)
            site_where.setdefault(op.module, site_where[path])
    skipped = {key[0] for key, t in tasks.items() if t.skips}
    if skipped & {p for p in hooked if split_source(p) is not None}:
        where = next(nodes[i].where for t in tasks.values() for i in t.skips
                     if split_source(nodes[i].site.path) is not None)
        raise GraphError("`.skip()` replaces a module's output; an operation inside a forward cannot be "
                         "skipped (set its `.output` instead)", where)
    return Plan(
        [tuple(sorted(d)) for d in deps], consumers, fns, tasks, hooked, site_where, hook_specs,
        grad_groups, grad_path, starters, runnable, all_steps, final,
        {i for i in range(n) if memory.shares_weights(i)},
        has_backward, max_step, skipped, source_specs,
    )


def _order_inplace(nodes: list[Node], node: Node, memory: Analysis, readers: dict[int, list[int]],
                   deps: list[set[int]], tasks: dict[SiteKey, SiteTask]) -> None:
    """An in-place edit runs after every earlier reader of the memory it edits; an edit
    of a site's value makes that site copy its value first and finish in its hook."""
    i = node.id
    for r in sorted(memory.edits[i]):
        target = nodes[r]
        if target.op == PARAM:
            raise GraphError("parameters are read-only: clone the weight first (w = ...weight.clone())",
                             node.where)
        deps[i].update(j for j in readers.get(r, ()) if j < i)
        if target.op == GET:
            task = tasks[site_key(target)]
            task.copy = True
            task.inplace.append(i)


def _grad_target(memory: Analysis, node: Node) -> tuple[int, tuple[int, ...]]:
    """The get node whose (full-batch) value the gradient is taken of, and the int
    indices that pick the tensor out of it (e.g. `out[0].grad` of a tuple output)."""
    target = memory.grad_targets.get(node.id)
    if target is None:
        raise GraphError(
            "`.grad` is available on a module's `.input`/`.output` (or an element of a tuple "
            "output, `out[0].grad`); take the gradient first, then index it: `out.grad[:, -1]`",
            node.where,
        )
    return target


_CACHE: dict[Any, Plan] = {}
_CACHE_SIZE = 256


def cached_plan(graph: Graph, registry: OpRegistry) -> Plan:
    """The plan of `graph`, reused for a graph of the same structure (a trace recorded
    again at the same place records the same structure; its tracer sets `plan_key`)."""
    key = graph.plan_key
    if key is None or registry is not REGISTRY:
        return build_plan(graph, registry)
    plan = _CACHE.get(key)
    if plan is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        plan = _CACHE[key] = build_plan(graph, registry)
    return plan
