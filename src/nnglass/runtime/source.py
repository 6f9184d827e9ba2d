"""Running `.source` sites: operations inside a module's forward (graph/source.py).

While one call of a module whose operations the graph reads or writes runs, a
`SourceMode` (a TorchFunctionMode) is on this thread's torch function stack. It sees
every torch call made meanwhile, counts the calls of each table operation (`softmax`,
`matmul`, ...) and, for the ones the graph names, fires their sites exactly as a module
hook fires `.input`/`.inputs`/`.output`: before the call with its arguments, after it
with its result, and what the graph sets is what the call gets or what the forward
continues with.

Invariants:
- Only for this run, only on the modules the graph names, only while their forward
  runs: the mode is pushed by the run's pre-hook on that module and popped by its
  forward hook, which torch calls even when the forward raises (or the run stops early);
  `uninstall` pops whatever an aborted forward left. Modes are per thread, so another
  thread running the same module never sees it, and nothing global is patched.
- The count is of the model's own calls: torch calls the graph's own nodes make (they run
  inside hooks while the mode is on, with `interp.current` set) and the calls of a module
  the graph itself calls (`lm.model.norm(h)`: the run is suspended) are not counted. The
  interpreter's bookkeeping between nodes (copies, row slicing) calls none of the table's
  operations, so it cannot shift a count either.
- Under hidden weights no operation's value may be (a view of) a parameter or buffer:
  a matmul inside a forward can take a weight as an operand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._function_modes import StackedMode
from ..errors import PolicyError
from ..graph.source import BY_FUNCTION, source_path
from .values import tensor_leaves, unwrap

if TYPE_CHECKING:
    from .interpreter import Interpreter


class SourceMode(StackedMode):
    """One call of one module: counts table operations, fires the sites the graph names."""

    def __init__(self, interp: Interpreter, module: torch.nn.Module, path: str,
                 wanted: dict[str, frozenset[str]], weights: frozenset[int] | None) -> None:
        super().__init__()
        self.interp, self.module, self.path = interp, module, path
        self.wanted = wanted  # op name ("softmax_0") -> kinds the graph touches
        self.weights = weights  # storages of parameters and buffers (hidden weights), else None
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:  # every torch call of the forward comes here: the fast path first
            op = BY_FUNCTION.get(func)
        except TypeError:  # an unhashable callable is none of the table's
            op = None
        interp = self.interp
        if op is None or interp.current >= 0 or interp.suspended:
            return func(*args, **kwargs)
        n = self.counts.get(op, 0)
        self.counts[op] = n + 1
        name = f"{op}_{n}"
        kinds = self.wanted.get(name)
        if kinds is None:
            return func(*args, **kwargs)
        path = source_path(self.path, name)
        if "inputs" in kinds:
            pair = (args, kwargs)
            self._check_weights(path, pair)
            new = interp.fire(path, "inputs", pair)
            if new is not pair:
                args, kwargs = unwrap(new)
                args, kwargs = tuple(args), dict(kwargs)
        if "input" in kinds and args:
            self._check_weights(path, args[0])
            args = (interp.fire(path, "input", args[0]), *args[1:])
        out = func(*args, **kwargs)
        if "output" in kinds:
            self._check_weights(path, out)
            out = interp.fire(path, "output", out)
        return out

    def _check_weights(self, path: str, value: Any) -> None:
        if self.weights is None:
            return
        for t in tensor_leaves(value):
            if _storage(t) in self.weights:
                raise PolicyError(f"`{path}` holds a weight of the model here, and the weights are hidden")


def weight_storages(model: torch.nn.Module) -> frozenset[int]:
    """Where the model's parameters and buffers live (a view shares its base's storage)."""
    return frozenset(_storage(t) for t in (*model.parameters(), *model.buffers())) - {0}


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake and meta tensors have no memory
        return 0


def source_hooks(interp: Interpreter, path: str, wanted: dict[str, frozenset[str]],
                 weights: frozenset[int] | None) -> tuple[Any, Any]:
    """The (pre-hook, forward hook) pair that keeps a `SourceMode` on while `path` runs."""
    open_modes: list[SourceMode] = interp.source_modes

    def pre(module: torch.nn.Module, args: tuple, *rest: Any) -> None:
        from .hooks import ACTIVE

        if ACTIVE.get() is not interp or interp.suspended:
            return None
        mode = SourceMode(interp, module, path, wanted, weights)
        mode.push()
        open_modes.append(mode)
        return None

    def post(module: torch.nn.Module, args: tuple, *rest: Any) -> None:
        if open_modes and open_modes[-1].module is module:
            open_modes.pop().pop()
        return None

    return pre, post


def close_modes(interp: Interpreter) -> None:
    """Pop every mode a forward that never returned left on the stack."""
    while interp.source_modes:
        interp.source_modes.pop().pop()
