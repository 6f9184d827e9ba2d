"""`LimitedInterpreter`: the Interpreter for a run with limits (a server's job).

Invariants, each checked before the work it bounds:
- Time: the deadline is checked before every node runs (the base checks it in every
  hook too), so a chain of ops inside one hook stops at the limit, at that node's line.
  One op is bounded by `op_bytes`; the worker's kill stays the backstop for it.
- One op: no op makes more than `op_bytes`; its size is computed from its arguments
  before it runs (`runtime.sizes`). Python integers stay within 64 bits.
- One run: the bytes the run holds stay within `live_bytes`. What counts:
  - each op's value, by what it made (`sizes.made_bytes`): a view of an input no larger
    than it makes nothing, and neither do the model's own tensors (site values,
    parameters): the model made them, within the server's prompt and token limits;
  - each save, by what it keeps beyond what its op made (a saved site value, or a view
    of one, counts in full: the result must carry it, and a reference keeps the
    model's memory alive past its time), checked before the save is taken;
  - a module call (`lm.lm_head(h)`), by its result, checked after it runs (its size is
    the model's business; the policy can forbid module calls).
  Not counted: the copies a run makes for its own safety (a site edited in place, a
  save copied in generation); they are at most the values already counted.
Values stay held until the run ends (the base never drops one), so the sum only grows,
except that every-step nodes replace their value each generation step.
Local runs with no limits use the plain `Interpreter` and pay none of this.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ResourceLimitError, TimeLimitError
from ..graph.ir import MODULE, Node
from .interpreter import Interpreter
from .python_sizes import check_int_result, value_bytes
from .sizes import DATA_DEPENDENT, PYTHON_NAMESPACES, TORCH_NAMESPACES, made_bytes, op_size, small_bound

_NO_LIMIT = 1 << 62


class LimitedInterpreter(Interpreter):
    """An Interpreter that refuses work over the limits of its `RunConfig`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.op_bytes = self.config.limits.op_bytes  # the most bytes one op may make
        self.live_bytes = self.config.limits.live_bytes  # the most bytes the run may hold
        self.live = 0  # bytes held now (see the module docstring)
        self._held = [0] * len(self.nodes)  # what each node's current value made
        self._made = (-1, 0)  # (node id, bytes) of the op that just ran, for `complete`

    # --- per node --------------------------------------------------------------------------
    def run_node(self, node: Node) -> Any:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeLimitError(f"the run went past its time limit of {self.seconds:g} s before this "
                                 "line ran: do less in one request", node.where)
        value = super().run_node(node)
        if node.op == MODULE:
            made = made_bytes(value, ())
            self._check_op(node, node.op, made)
            self._check_live(node, made)
            self._made = (node.id, made)
        return value

    def call_op(self, node: Node, fn: Any, args: tuple, kwargs: dict) -> Any:
        op_limit = _NO_LIMIT if self.op_bytes is None else self.op_bytes
        headroom = (_NO_LIMIT if self.live_bytes is None else self.live_bytes) - self.live
        name = node.op
        # Tiny arguments cannot make a big result (see `small_bound`): no meta run needed.
        # Not for operator/builtins ops given strings (a format can ask for any width),
        # nor for an admin's ops (nothing is known about them).
        bound = None
        if name not in DATA_DEPENDENT and name.startswith(TORCH_NAMESPACES + PYTHON_NAMESPACES):
            bound = small_bound(args, kwargs, strings_ok=name.startswith(TORCH_NAMESPACES))
        if bound is None or bound > min(op_limit, headroom):
            try:
                size = op_size(name, fn, args, kwargs, op_limit)
            except ResourceLimitError as e:
                raise ResourceLimitError(e.message, node.where) from None
            if size is not None:
                self._check_live(node, size)
        out = fn(*args, **kwargs)
        try:
            check_int_result(name, out)
        except ResourceLimitError as e:
            raise ResourceLimitError(e.message, node.where) from None
        made = made_bytes(out, (args, kwargs))
        self._check_op(node, name, made)  # an op the pre-check cannot see into (an admin's)
        self._made = (node.id, made)
        return out

    def complete(self, i: int, value: Any) -> None:
        node = self.nodes[i]
        made = self._made[1] if self._made[0] == i else 0
        self._made = (-1, 0)
        if node.save:
            kept = max(value_bytes(value) - made, 0)  # beyond what the op made: a site value, a view
            self._check_live(node, made - self._held[i] + kept)
            self.live += kept
        self.live += made - self._held[i]
        self._held[i] = made
        super().complete(i, value)

    # --- refusals --------------------------------------------------------------------------
    def _check_op(self, node: Node, name: str, size: int) -> None:
        if self.op_bytes is not None and size > self.op_bytes:
            raise ResourceLimitError(f"`{name}` made {size:,} bytes, over this server's limit of "
                                     f"{self.op_bytes:,} bytes for one op", node.where)

    def _check_live(self, node: Node, more: int) -> None:
        if self.live_bytes is not None and self.live + more > self.live_bytes:
            raise ResourceLimitError(
                f"this run would hold {self.live + more:,} bytes (this line adds {more:,}), over this "
                f"server's limit of {self.live_bytes:,} bytes for one run's values: save less, or "
                "slice before saving",
                node.where,
            )
