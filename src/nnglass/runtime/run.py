"""`execute`: one graph, one model, one forward (or generate) call, hooks in between.

Invariant: whatever happens (error mid-forward, early stop, out-of-order), the model is
left as it was: no hooks, no edited weights, no `.grad`; the next run starts clean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..errors import ExecutionError, NNglassError, OutOfOrderError
from ..graph.ir import GRAD, IMPORT, SET_GRAD, Graph
from ..graph.ops import REGISTRY, OpRegistry
from .backend import Runnable
from .hooks import install, uninstall
from .interpreter import EarlyStop, Interpreter
from .limited import LimitedInterpreter
from .limits import active_limits
from .order import OrderLog
from .plan import cached_plan


def execute(
    graph: Graph,
    model: torch.nn.Module,
    forward: Callable[[Interpreter], Any],
    rows: list[tuple[int, ...]],  # per invoke: (start, stop) or a runtime.window.Window
    batch_size: int,
    *,
    registry: OpRegistry = REGISTRY,
    can_stop: bool = True,
    interpreter: type[Interpreter] = Interpreter,
    imports: dict[tuple[int, int], Any] | None = None,
    order: OrderLog | None = None,
    copy_saves: bool = False,
) -> dict[int, Any]:
    """Run `graph` while `forward(interp)` runs the model; return the saved values by node id.

    `imports`: in a session, values of earlier traces by (trace index, node id).
    `order`: site orders of earlier runs of this model, checked first and then extended.
    """
    plan = cached_plan(graph, registry)
    if order is not None:
        order.check(plan, graph)
    limits = active_limits()
    if interpreter is Interpreter and limits.bounds_run():
        interpreter = LimitedInterpreter  # a plain local run pays nothing for limits
    interp = interpreter(plan, graph, model, rows, batch_size, can_stop=can_stop, imports=imports)
    interp.deadline, interp.seconds = limits.deadline(), limits.seconds
    if isinstance(interp, LimitedInterpreter):
        interp.op_bytes, interp.live_bytes = limits.op_bytes, limits.live_bytes
    interp.hide_weights = limits.hide_weights
    if copy_saves or (order is not None and order.edits_outputs):
        interp.copy_saves = True
    try:
        installed = install(model, interp)
        try:
            interp.start()
            try:
                # Without a backward nothing can use the autograd graph (saved values are
                # detached): don't build it. Same numbers, less time and memory.
                with torch.enable_grad() if plan.has_backward else torch.no_grad():
                    forward(interp)
            except EarlyStop:
                pass
            except NNglassError:
                raise
            except Exception as e:
                raise _model_error(interp, e) from e
        finally:
            uninstall(interp, installed)
        if order is not None:
            order.record(interp.fired)
        check_finished(interp, missing_steps_ok=graph.mode == "generate")
        if not interp.copy_saves and interp.saves_changed():
            # Something edited a saved tensor in place after it was saved (e.g. a
            # ReLU(inplace=True) after the hooked module): run again, copying each save,
            # and remember that this model does that.
            if order is not None:
                order.edits_outputs = True
            return execute(graph, model, forward, rows, batch_size, registry=registry,
                           can_stop=can_stop, interpreter=interpreter, imports=imports, order=order,
                           copy_saves=True)  # fmt: skip
        return interp.saved
    except BaseException as e:
        e.node_id = culprit(interp, e)  # type: ignore[attr-defined]  # co-tenancy: whose error
        raise
    finally:
        interp.close()


def culprit(interp: Interpreter, e: BaseException) -> int | None:
    """The node a run's failure belongs to: the one running when it failed, else the last
    edit before the model failed, else the first node that never ran (None: unknown)."""
    known = getattr(e, "node_id", None)
    if known is not None:
        return known
    if interp.current >= 0:
        return interp.current
    if isinstance(e, ExecutionError) and interp.last_edit >= 0:
        return interp.last_edit
    unfinished = interp.unfinished() if isinstance(e, OutOfOrderError) else []
    return unfinished[0].id if unfinished else None


def check_finished(interp: Interpreter, missing_steps_ok: bool = False) -> None:
    """Every node must have run; name the first that did not, and why.

    In generation, nodes of steps that never ran (EOS came first) are left out: their
    saved values raise on `.value` instead.
    """
    if interp.left == 0:
        return
    unfinished = interp.unfinished()
    if missing_steps_ok and unfinished:
        never = {n.id for n in unfinished if n.site is not None and n.site.step > interp.step}
        for n in unfinished:  # ids ascend, so a node's dependencies are decided first
            if any(d in never for d in interp.plan.deps[n.id]):
                never.add(n.id)
        unfinished = [n for n in unfinished if n.id not in never]
    if not unfinished:
        return
    for node in unfinished:
        if node.site is not None:
            s = node.site
            ran = interp.calls.get((s.path, s.kind), 0)
            step = f" at generation step {s.step}" if interp.plan.max_step else ""
            if s.step > interp.step:
                raise OutOfOrderError(
                    f"generation step {s.step} never happened (the last step was "
                    f"{interp.step}): `.value` of this node has nothing to return",
                    node.where,
                )
            raise OutOfOrderError(
                f"`{s.path or '<root>'}.{s.kind}` call {s.call}{step} never happened: the "
                f"module ran {ran} time(s) in that step{_stop_hint(interp)}",
                node.where,
            )
        if node.op in (GRAD, SET_GRAD):
            raise OutOfOrderError(
                "this gradient was never computed: no `.backward()` after it reaches this "
                "value (does the loss depend on it?)",
                node.where,
            )
    node = unfinished[0]
    blocker = interp.nodes[interp._blocker(node)]
    raise OutOfOrderError(
        f"this value was never computed: it waits on line {blocker.where}, which never ran",
        node.where,
    )


def _stop_hint(interp: Interpreter) -> str:
    return "" if interp.calls else " (no hooked module ran at all: is it part of the forward?)"


def _model_error(interp: Interpreter, e: Exception) -> ExecutionError:
    """The model's own code failed: point at the last edit that could have caused it."""
    what = f"the model's forward failed: {type(e).__name__}: {e}"
    if interp.last_edit >= 0:
        return ExecutionError(f"{what}\n  (the last value set before the failure is here)",
                              interp.nodes[interp.last_edit].where)  # fmt: skip
    first = interp.nodes[0].where if interp.nodes else ""
    return ExecutionError(f"{what}\n  (no intervention had changed the forward yet)", first)


def run_session(model: Runnable, graph: Graph) -> dict[int, dict[int, Any]]:
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
        saved = model.run_graph(run, imports=imports)
        for i in keep:
            imports[(k, i)] = saved[i]
        results[k] = {i: v for i, v in saved.items() if child.nodes[i].save}
    return results
