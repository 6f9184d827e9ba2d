"""nnsight's remaining verbs, spelled as nnsight spells them: `nnglass.save(x)`,
`tracer.iter[...]` (steps) and `with loss.backward():`. They only record; what they mean is
stated where defined.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import TraceError
from ..graph.ir import GENERATE_KWARGS
from .proxy import Proxy, has_proxy
from .tracer import Stop, Tracer, current_tracer, user_where

if TYPE_CHECKING:
    from ..graph.ir import Node


def save(obj: Any) -> Any:
    """nnsight's `nnglass.save(x)`: `x.save()` for a proxy; a list, tuple or dict holding
    proxies is saved as one value (its `.value` after the trace); anything else is
    returned as it is (it is already a real value)."""
    if type(obj) is Proxy:
        return obj.save()
    if type(obj) in (list, tuple, dict) and has_proxy(obj):
        tracer = current_tracer("nnglass.save(...) of traced values")
        return tracer.record(f"builtins.{type(obj).__name__}", (obj,)).save()
    return obj



class BackwardBlock:
    """What `x.backward()` returns. Unused, the backward stays where it was recorded. As a
    block (`with loss.backward():`, nnsight's spelling), the backward moves to where the
    block ends: `.grad`s declared inside are declared before it, as the runtime requires
    (the backward still runs once, after the forward values it needs)."""

    def __init__(self, tracer: Tracer, node_id: int) -> None:
        self.tracer, self.node_id = tracer, node_id
        self._node: Node | None = None

    def __enter__(self) -> None:
        self._node = self.tracer.take_last(self.node_id)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._node is not None and (exc_type is None or exc_type is Stop):
            self.tracer.put_back(self._node)


class StepIndex:
    """`tracer.iter[...]`: a step, every step, or a range of steps."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __getitem__(self, key: int | slice) -> Steps:
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            return Steps(self.tracer, key, key + 1)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop = key.start or 0, key.stop
            if not isinstance(start, int) or start < 0 or not (stop is None or isinstance(stop, int)):
                raise TraceError(f"tracer.iter[{start}:{stop}]: steps are ints >= 0", user_where())
            return Steps(self.tracer, start, stop)
        raise TraceError(f"tracer.iter[...] takes a step k or a slice a:b, got {key!r}", user_where())


class Steps:
    """Steps start..stop-1 (stop None: every step from start on)."""

    def __init__(self, tracer: Tracer, start: int, stop: int | None) -> None:
        self.tracer, self.start, self.stop = tracer, start, stop
        self._scopes: list[Any] = []
        steps = tracer.graph.options.get(GENERATE_KWARGS, {}).get("max_new_tokens")
        last = start if stop is None else stop - 1
        if isinstance(steps, int) and last >= steps:  # known while recording: say so here
            why = f"tracer.iter: this generation has {steps} steps (0..{steps - 1}), step {last} never runs"
            raise TraceError(why, user_where())

    def __enter__(self) -> Tracer:
        if self.start == 0 and self.stop is None:
            scope = self.tracer.all()
        elif self.stop == self.start + 1:
            scope = self.tracer.step(self.start)
        else:
            raise TraceError("a `with` block is recorded once, so it stands for one step or for every "
                             "step: loop instead (`for k in tracer.iter[a:b]:`), or use tracer.all()",
                             user_where())
        self._scopes.append(scope)
        return scope.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._scopes.pop().__exit__(*exc)

    def __iter__(self) -> Iterator[int]:
        if self.stop is None:
            raise TraceError("`for k in tracer.iter[a:]` has no end: give one (tracer.iter[a:b]), or use "
                             "`with tracer.all():`", user_where())
        for k in range(self.start, self.stop):
            with self.tracer.step(k):
                yield k
