"""Several runs behind one set of hooks: the interpreters of the jobs that share one
forward pass of a continuous generation batch (runtime/decode_batch.py), each at its own
generation step.

`Multiplex` is installed as the active run (runtime/hooks.py); a hook's `fire` goes to
each member in turn, and each member sees and sets only its own window of the value
(its rows, and its own width of each position axis: runtime/window.py).

Invariants:
- A member's graph has no whole-batch node: it is merged alone (graph/merge.py), so
  every node addresses a window, also `lm.output` and reductions over the batch axis.
- A member never changes what another member sees outside its own window: setters write
  into a copy of the site value inside the member's window only, and a member may not
  set a value that is not batch-first (a table shared by every row) nor hand the model's
  KV cache to a module call.
- A member that fails (its node raises, a setter does not fit, a limit) is taken out at
  once, with its exception in `failed`; the value it was given goes on to the others
  unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ExecutionError, NNglassError
from .finish import culprit, model_error
from .interpreter import Interpreter
from .values import tensor_leaves


class SharedBatchMember:
    """Mixed into a member's interpreter class: what a run may not do in a shared batch."""

    def call_module(self, path: str, args: tuple, kwargs: dict) -> Any:
        if _holds_cache((args, kwargs)):
            raise ExecutionError("a module call cannot be given the model's KV cache in a shared "
                                 "generation: it holds every job's rows",
                                 self.nodes[self.current].where if self.current >= 0 else "")
        return super().call_module(path, args, kwargs)  # type: ignore[misc]

    def _replace(self, value: Any, new: Any, invoke: int | None) -> Any:
        for t in tensor_leaves(value):
            if not t.dim() or t.shape[0] != self.batch_size:  # type: ignore[attr-defined]
                raise ExecutionError("this value is shared by every row of the batch (its first axis "
                                     "is not the batch): it cannot be set in a shared generation",
                                     self.nodes[self.current].where)  # type: ignore[attr-defined]
        return super()._replace(value, new, invoke)  # type: ignore[misc]


_MEMBER_KINDS: dict[type, type] = {}


def member_kind(kind: type[Interpreter]) -> type[Interpreter]:
    """`kind` (Interpreter, LimitedInterpreter) as a shared-batch member."""
    made = _MEMBER_KINDS.get(kind)
    if made is None:
        made = _MEMBER_KINDS[kind] = type(f"Batch{kind.__name__}", (SharedBatchMember, kind), {})
    return made


def _holds_cache(x: Any) -> bool:
    from transformers.cache_utils import Cache

    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, Cache):
            return True
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return False


@dataclass
class _Plan:  # what runtime/hooks.install reads of a run's plan
    hook_specs: list[tuple[str, frozenset[str], bool]]
    site_where: dict[str, str]
    skipped: set[str] = field(default_factory=set)  # a member's skip replaces its rows (a setter)
    source_specs: dict[str, Any] = field(default_factory=dict)  # `.source` graphs never join a batch


class Multiplex:
    """The active run of one shared forward pass: fires every member at every hook."""

    def __init__(self, members: list[Interpreter]) -> None:
        self.members = list(members)
        self.failed: dict[Interpreter, BaseException] = {}
        kinds: dict[str, tuple[set[str], bool]] = {}
        where: dict[str, str] = {}
        for m in members:
            for path, pre, out in m.plan.hook_specs:
                have = kinds.setdefault(path, (set(), False))
                kinds[path] = (have[0] | pre, have[1] or out)
            for path, line in m.plan.site_where.items():
                where.setdefault(path, line)
        self.plan = _Plan([(p, frozenset(pre), out) for p, (pre, out) in kinds.items()], where)
        self.hide_weights = any(m.hide_weights for m in members)
        self.active_token: Any = None
        self.source_modes: list[Any] = []
        self.edits = {m: m.last_edit for m in members}  # to tell who edited before a model error

    @property
    def suspended(self) -> int:  # a member running a module call: hooks pass through
        return sum(m.suspended for m in self.members)

    def fire(self, path: str, kind: str, value: Any) -> Any:
        for m in list(self.members):
            try:
                value = m.fire(path, kind, value)
            except Exception as e:
                self.fail(m, e)
        return value

    def fail(self, m: Interpreter, e: BaseException) -> None:
        if not isinstance(e, NNglassError):
            e = model_error(m, e) if isinstance(e, Exception) else e
        e.node_id = culprit(m, e)  # type: ignore[attr-defined]
        m.current = -1
        self.failed[m] = e
        if m in self.members:
            self.members.remove(m)

    def editors(self) -> list[Interpreter]:
        """The members that set something in this pass (suspects when the model fails)."""
        return [m for m in self.members if m.last_edit != self.edits[m]]
