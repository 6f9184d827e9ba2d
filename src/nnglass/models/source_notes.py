"""`.source` operations in a fake or meta forward: their values for record-time metadata.

While a capture runs with `OpNotes` on, every call of a table operation (graph/source.py)
is noted, for every module call open at that moment, as the sites
`<module>.source.<op>_<n>` "inputs" and "output", so `softmax_0.output.shape` answers
while recording, and the names a forward makes can be listed.

Invariant: the count is the runtime's (runtime/source.py): per module call, in execution
order, inclusive of the functions and submodules the forward calls. A module call the
meta forward does not run again (a repeat, models/metaforward.py) replays its own
operations through `replay`, so the modules around it count them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..graph.source import SOURCE, op_of, parse_name, source_path

Note = Callable[[str, str, Any], None]  # (path, kind, value)


class OpNotes(TorchFunctionMode):
    def __init__(self, note: Note) -> None:
        super().__init__()
        self.note = note
        self.open: list[tuple[str, dict[str, int]]] = []  # module calls running: (path, op counts)

    def enter(self, path: str) -> None:
        self.open.append((path, {}))

    def exit(self, path: str) -> None:
        if self.open and self.open[-1][0] == path:
            self.open.pop()

    def _names(self, op: str, calls: list[tuple[str, dict[str, int]]]) -> list[str]:
        names = []
        for path, counts in calls:
            n = counts.get(op, 0)
            counts[op] = n + 1
            names.append(source_path(path, f"{op}_{n}"))
        return names

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op = op_of(func)
        if op is None or not self.open:
            return func(*args, **kwargs)
        names = self._names(op, self.open)
        for name in names:
            self.note(name, "inputs", (args, kwargs))
        out = func(*args, **kwargs)
        for name in names:
            self.note(name, "output", out)
        return out

    def replay(self, notes: list[tuple[str, str, Any]]) -> None:
        """A repeated module call (the innermost open one) gave back `notes` (paths relative
        to it): its own operations count for the module calls around it."""
        outer = self.open[:-1]
        names: list[str] = []
        prefix = f"{SOURCE}."
        for rel, kind, value in notes:
            parsed = parse_name(rel[len(prefix):]) if rel.startswith(prefix) else None
            if parsed is None:
                continue
            if kind == "inputs":
                names = self._names(parsed[0], outer)
            for name in names:
                self.note(name, kind, value)


def operation_paths(model: torch.nn.Module, run: Callable[[], Any]) -> list[str]:
    """The `.source` path of every operation the modules of `model` make in one real
    forward `run()` (a server lists them once a model is loaded: a graph may name only
    these)."""
    seen: set[str] = set()
    notes = OpNotes(lambda path, kind, value: seen.add(path))
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, path=path: notes.enter(path)))
        handles.append(module.register_forward_hook(lambda m, a, o, path=path: notes.exit(path),
                                                    always_call=True))
    try:
        with torch.no_grad(), notes:
            run()
    finally:
        for h in handles:
            h.remove()
    return sorted(seen)
