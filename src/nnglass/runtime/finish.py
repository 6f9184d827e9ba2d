"""How a run ends: every node must have run (else: which did not, and why), and a
failure is pinned on one node (the user's line; in a shared pass, the job it belongs to).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ExecutionError, OutOfOrderError
from ..graph.ir import GET, GRAD, SET_GRAD, Node, path_name
from ..graph.source import split as split_source
from .values import UNSET

if TYPE_CHECKING:
    from .interpreter import Interpreter


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
            op = split_source(s.path)
            what = "module" if op is None else f"operation (of `{path_name(op.module)}`'s forward)"
            hint = stop_hint(interp) if op is None else "; print(module.source) lists what a forward makes"
            raise OutOfOrderError(
                f"`{path_name(s.path)}.{s.kind}` call {s.call}{step} never happened: the "
                f"{what} ran {ran} time(s) in that step{hint}",
                node.where,
            )
        if node.op in (GRAD, SET_GRAD):
            raise OutOfOrderError(
                "this gradient was never computed: no `.backward()` after it reaches this "
                "value (does the loss depend on it?)",
                node.where,
            )
    node = unfinished[0]
    waits_on = interp.nodes[blocker(interp, node)]
    raise OutOfOrderError(
        f"this value was never computed: it waits on line {waits_on.where}, which never ran",
        node.where,
    )


def stop_hint(interp: Interpreter) -> str:
    return "" if interp.calls else " (no hooked module ran at all: is it part of the forward?)"


def model_error(interp: Interpreter, e: Exception) -> ExecutionError:
    """The model's own code failed: point at the last edit that could have caused it."""
    what = f"the model's forward failed: {type(e).__name__}: {e}"
    if interp.last_edit >= 0:
        return ExecutionError(f"{what}\n  (the last value set before the failure is here)",
                              interp.nodes[interp.last_edit].where)
    first = interp.nodes[0].where if interp.nodes else ""
    return ExecutionError(f"{what}\n  (no intervention had changed the forward yet)", first)


def out_of_order(interp: Interpreter, node: Node) -> None:
    """`node` must run now (in its site's hook) but waits on a value the model has not made."""
    b = interp.nodes[blocker(interp, node)]
    what = f"`{path_name(b.site.path)}.{b.site.kind}`" if b.site else f"%{b.id} ({b.op})"
    raise OutOfOrderError(
        f"this needs a value from {what} (line {b.where}), which the model has not "
        "computed yet here: values can only flow forward through the model",
        node.where,
    )


def blocker(interp: Interpreter, node: Node) -> int:
    """The earliest unfinished node `node` waits on (follows the chain down)."""
    stack, seen = [node.id], set()
    best = node.id
    while stack:
        i = stack.pop()
        for d in interp.plan.deps[i]:
            if interp.values[d] is UNSET and d not in seen:
                seen.add(d)
                stack.append(d)
                if interp.nodes[d].op in (GET, GRAD) or d < best:
                    best = d
    return best
