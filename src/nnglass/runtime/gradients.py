"""The gradient half of the Interpreter: `.grad` reads and edits, and `backward` nodes.

A `get` whose gradient the graph wants registers a tensor hook on that site's value
(`_watch_grad`); a `backward` node runs `torch.autograd.grad` to those values only, so
nothing accumulates into any `.grad`. When the gradient arrives, the hook completes the
site's `grad` nodes (reads) and applies its `set`s (edits) in program order, then runs
whatever became ready, with autograd on, before handing the gradient on.

Invariants:
- One backward at a time: a `backward` node that becomes ready while one runs waits
  (`_deferred`) and runs when it ends.
- A frozen activation (no `requires_grad`, e.g. frozen weights) becomes a leaf of its
  own graph; a parameter never does.
- `close` removes every hook, also after a failed run.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ExecutionError
from ..graph.ir import GRAD, Node
from .finish import out_of_order
from .values import UNSET, index_path, replace_at

if TYPE_CHECKING:
    from .plan import Plan


class Gradients:
    """Mixed into the Interpreter (runtime/interpreter.py), whose state it shares."""

    plan: Plan
    nodes: list[Node]
    values: list[Any]
    remaining: list[int]
    _ready: list[int]
    _grad_hooks: list[Any]
    _grad_pending: dict[int, torch.Tensor]  # get node -> the tensor whose gradient it awaits
    _in_backward: bool
    _deferred: list[int]

    if TYPE_CHECKING:
        def complete(self, i: int, value: Any) -> None: ...
        def drain(self) -> None: ...
        def values_of(self, arg: Any) -> Any: ...
        def _slice(self, value: Any, invoke: int | None) -> Any: ...
        def _replace(self, value: Any, new: Any, invoke: int | None) -> Any: ...

    def backward(self, node: Node, tensor: Any, gradient: Any = None) -> None:
        targets = [i for i in self._grad_pending if i < node.id]
        if not targets:
            return None
        inputs = [self._grad_pending.pop(i) for i in targets]
        self._in_backward = True
        try:
            with torch.enable_grad():
                torch.autograd.grad([tensor], inputs, grad_outputs=[gradient], retain_graph=True,
                                    allow_unused=True)
        finally:
            self._in_backward = False
            for i in self._deferred:
                heapq.heappush(self._ready, i)
            self._deferred.clear()
        return None

    def _watch_grad(self, get_id: int, value: Any) -> Any:
        """Hook the gradient of the site value read by `get_id` (the full batch)."""
        group = self.plan.grad_groups[get_id]
        _, path = self.plan.grad_path[group[0]]
        tensor = index_path(value, path)
        if not isinstance(tensor, torch.Tensor):
            raise ExecutionError("`.grad` needs a tensor here", self.nodes[group[0]].where)
        if not tensor.requires_grad:
            # Frozen weights: make this activation a leaf of its own graph (never a parameter).
            tensor = tensor.detach().requires_grad_(True)
            value = replace_at(value, path, tensor)
        invoke = self.nodes[get_id].invoke

        def on_grad(grad: torch.Tensor) -> torch.Tensor:
            for i in group:
                node = self.nodes[i]
                if self.values[i] is not UNSET:
                    continue
                if self.remaining[i]:
                    out_of_order(self, node)
                if node.op == GRAD:
                    self.complete(i, self._slice(grad, invoke))
                else:
                    grad = self._replace(grad, self.values_of(node.args[1]), invoke)
                    self.complete(i, None)
                with torch.enable_grad():  # forward-side nodes that become ready here keep autograd
                    self.drain()
            return grad

        self._grad_hooks.append(tensor.register_hook(on_grad))
        self._grad_pending[get_id] = tensor
        return value

    def close(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()
        self._grad_pending.clear()
