"""`model.edit()`: interventions recorded once that apply to every later trace of the model.

An edit block records nodes like a trace, without inputs, and runs nothing; the model keeps
the recorded fragment (`Graph`: nodes and attached tensors). Every later tracer of that model
starts by copying the fragments into its own graph (`replay`), so:

Invariants:
- Edits are part of each graph the client sends: a server never holds one, so they cannot
  leak between users, and `clear_edits()` is purely local.
- Edit nodes come first, before the trace's own nodes: a getter at an edited site sees the
  edit (program order). They act on the whole batch, and in generation on every step.
- An edit block saves nothing (nothing runs when it is recorded); `edit()` returns a copy
  of the model that carries the edits, `edit(inplace=True)` edits the model itself.
"""

from __future__ import annotations

from typing import Any

from ..errors import TraceError
from ..graph.ir import ALL_STEPS, GENERATE, Graph, Node, Site, renumber
from .tracer import Stop, Tracer, _shape, user_where


class EditTracer(Tracer):
    """Records an edit block; on exit hands the fragment to the model it edits."""

    def __init__(self, model: Any, inplace: bool) -> None:
        target = model if inplace else _copy(model)
        super().__init__(target, (), {}, model._local)
        self.target = target

    def __enter__(self) -> Any:  # type: ignore[override]
        super().__enter__()
        return self.target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        from .tracer import _CURRENT

        _CURRENT.reset(self._token)
        if self._mode is not None:
            self._mode.pop()
            self._mode = None
        if exc_type is not None and exc_type is not Stop:
            return False
        saved = [n for n in self.graph.nodes if n.save]
        if saved:
            why = "an edit saves nothing (it runs inside later traces): save values inside a trace instead"
            raise TraceError(why, saved[0].where)
        self.check()
        edits = [*self.target._edits, Graph(self.graph.model, self.graph.nodes, [], self.graph.tensors)]
        object.__setattr__(self.target, "_edits", tuple(edits))
        return exc_type is Stop

    def replay_edits(self) -> None:  # an edit block builds on nothing: it is stored, not run
        return None


def _copy(model: Any) -> Any:
    """A second handle on the same module, with edits of its own (nnsight's non-inplace edit)."""
    twin = object.__new__(type(model))
    twin.__dict__.update(model.__dict__)
    return twin


def replay(tracer: Tracer, fragment: Graph) -> None:
    """Copy an edit fragment's nodes into `tracer`'s graph, ids and tensors renumbered."""
    graph = tracer.graph
    offset = len(graph.nodes)
    tensors = {key: graph.attach(t) for key, t in fragment.tensors.items()}
    every_step = graph.mode == GENERATE

    def remap(x: Any) -> Any:
        return renumber(x, offset, lambda ref: tensors[ref.key])

    for n in fragment.nodes:
        site = n.site
        if every_step and site is not None:
            site = Site(site.path, site.kind, site.call, ALL_STEPS)
        step = ALL_STEPS if every_step else n.step
        where = n.where or user_where()
        node = Node(n.id + offset, n.op, remap(n.args), remap(n.kwargs), site, None, step, False, where)
        graph.nodes.append(node)
        tracer._shape.append(_shape(node))
