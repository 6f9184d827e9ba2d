"""`execute`: one graph, one model, one forward (or generate) call, hooks in between; and
sessions, several traces in order. The run itself is `Interpreter.run`.

Invariant: whatever happens (error mid-forward, early stop, out-of-order), the model is
left as it was: no hooks, no edited weights, no `.grad`; the next run starts clean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..graph.ir import IMPORT, Graph
from ..graph.ops import REGISTRY, OpRegistry
from .backend import Runnable
from .interpreter import Interpreter
from .limited import LimitedInterpreter
from .limits import NO_LIMITS, PLAIN_RUN, RunConfig, RunLimits
from .order import OrderLog
from .plan import cached_plan


def execute(
    graph: Graph,
    model: torch.nn.Module,
    forward: Callable[[Interpreter], Any],
    rows: list[tuple[int, ...]],  # per invoke: (start, stop) or a runtime.window.Window
    batch_size: int,
    config: RunConfig = PLAIN_RUN,
    *,
    registry: OpRegistry = REGISTRY,
    imports: dict[tuple[int, int], Any] | None = None,
    order: OrderLog | None = None,
) -> dict[int, Any]:
    """Run `graph` while `forward(interp)` runs the model; return the saved values by node id.

    `imports`: in a session, values of earlier traces by (trace index, node id).
    `order`: site orders of earlier runs of this model, checked first and then extended.
    A run under limits gets a `LimitedInterpreter`; a plain local run pays nothing for them.
    """
    plan = cached_plan(graph, registry)
    if order is not None:
        order.check(plan, graph)
        if order.edits_outputs:
            config = replace(config, copy_saves=True)
    kind = LimitedInterpreter if config.limits.bounds_run() else Interpreter
    return kind(plan, graph, model, rows, batch_size, config, imports).run(forward, order)


def run_session(model: Runnable, graph: Graph, limits: RunLimits = NO_LIMITS) -> dict[int, dict[int, Any]]:
    """Run a session's traces in order; return each trace's saved values by trace index.

    A value a later trace imports is kept by saving it in a run-local copy of the
    earlier trace's graph; only what the user saved is returned.
    """
    wanted: dict[int, set[int]] = {}
    for child in graph.children:
        for node in child.nodes:
            if node.op == IMPORT:
                wanted.setdefault(node.args[0], set()).add(node.args[1])
    imports: dict[tuple[int, int], Any] = {}
    results: dict[int, dict[int, Any]] = {}
    for k, child in enumerate(graph.children):
        keep = wanted.get(k, set())
        run = child
        if keep:
            nodes = [replace(n, save=True) if n.id in keep and not n.save else n for n in child.nodes]
            key = None if child.plan_key is None else (child.plan_key, frozenset(keep))
            run = replace(child, nodes=nodes, plan_key=key)
        saved = model.run_graph(run, imports=imports, limits=limits)
        for i in keep:
            imports[(k, i)] = saved[i]
        results[k] = {i: v for i, v in saved.items() if child.nodes[i].save}
    return results
