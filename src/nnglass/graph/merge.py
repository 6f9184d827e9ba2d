"""Co-tenancy: several users' graphs as one graph, so they share one forward pass.

Invariants:
- Only graphs that cannot see each other's rows are merged: plain traces (no generate,
  no session), no gradients (a backward would cross rows), same model and same forward
  options, none of them a tensor (a tensor option is one graph's data, not shared).
  `share_key` says which graphs may be merged: equal keys, and not None.
  Prompt widths may differ: the batch is left-padded to one width, and each graph sees
  its own width (below).
- Every node of a merged graph addresses one window (runtime/window.py): its invokes are
  renumbered, and its whole-batch nodes (invoke None) get a group of their own — the
  rows of all its invokes — listed with the graph's own padded width in
  `options["groups"]` as [first invoke, last invoke, width]. `group_rows` turns that
  into windows: the graph's rows and the last `width` positions of the batch, so the
  padding added for longer co-tenants is invisible and `lm.output` of one user is that
  user's rows and positions only. No node of a merged graph has invoke None.
- `split` gives each graph exactly the saved values it would have had alone, by its own
  node ids. Numbers differ from a lone run only as batch composition allows (float
  tolerance, docs/reference.md, numbers).
"""

from __future__ import annotations

import json
from typing import Any

from ..runtime.window import Window
from .ir import (
    BACKWARD,
    FORWARD_KWARGS,
    GRAD,
    GROUPS,
    IMPORT,
    SET_GRAD,
    TRACE,
    VALIDATE,
    Graph,
    Invoke,
    Node,
    TensorRef,
    find,
    renumber,
)
from .wire import encode_value

_NOT_SHARED = frozenset({BACKWARD, GRAD, SET_GRAD, IMPORT})


def share_key(graph: Graph) -> str | None:
    """Graphs with the same key can run merged; None: this graph runs alone."""
    if graph.mode != TRACE or graph.children or graph.options.get(VALIDATE):
        return None
    if any(node.op in _NOT_SHARED for node in graph.nodes):
        return None
    if find(graph.options.get(FORWARD_KWARGS, {}), TensorRef) is not None:
        return None  # a tensor argument (labels=...) is this graph's own data: never merged
    forward = encode_value(graph.options.get(FORWARD_KWARGS, {}))
    return f"{graph.model}\n{json.dumps(forward, sort_keys=True)}"


def width(graph: Graph) -> int:
    """The graph's padded prompt width when it runs alone (-1: no prompt tensors)."""
    widths = [graph.tensors[ref.key].shape[-1] for inv in graph.invokes
              for ref in inv.kwargs.values() if type(ref) is TensorRef]
    return max(widths, default=-1)


def merge(graphs: list[Graph]) -> tuple[Graph, list[int]]:
    """One graph running all of `graphs`; and each one's node-id offset in it."""
    total_invokes = sum(len(g.invokes) for g in graphs)
    merged = Graph(model=graphs[0].model, mode=TRACE, options={
        FORWARD_KWARGS: graphs[0].options.get(FORWARD_KWARGS, {}), GROUPS: []}, merged_from=list(graphs))
    offsets: list[int] = []
    for k, g in enumerate(graphs):
        node_offset, invoke_offset = len(merged.nodes), len(merged.invokes)
        offsets.append(node_offset)
        prefix = f"j{k}."
        for key, tensor in g.tensors.items():
            merged.tensors[prefix + key] = tensor
        for inv in g.invokes:
            merged.invokes.append(Invoke(_shift(inv.args, 0, prefix), _shift(inv.kwargs, 0, prefix)))
        merged.options[GROUPS].append([invoke_offset, len(merged.invokes) - 1, width(g)])
        group = total_invokes + k
        for n in g.nodes:
            merged.nodes.append(Node(
                n.id + node_offset, n.op, _shift(n.args, node_offset, prefix),
                _shift(n.kwargs, node_offset, prefix), n.site,
                group if n.invoke is None else n.invoke + invoke_offset, n.step, n.save, n.where,
            ))
    return merged, offsets


def split(saved: dict[int, Any], graphs: list[Graph], offsets: list[int]) -> list[dict[int, Any]]:
    """Each graph's saved values, by its own node ids."""
    out: list[dict[int, Any]] = []
    for g, offset in zip(graphs, offsets):
        out.append({n.id: saved[n.id + offset] for n in g.nodes if n.save and n.id + offset in saved})
    return out


def group_rows(graph: Graph, rows: list[tuple[int, int]], full: int) -> list[tuple[int, ...]]:
    """Each invoke's window, then each merged graph's whole-batch window (if merged);
    `full`: the batch's padded width. Unmerged, `rows` as they are."""
    groups = graph.options.get(GROUPS)
    if not groups:
        return rows
    invokes: list[tuple[int, ...]] = list(rows)
    whole: list[tuple[int, ...]] = []
    for first, last, own in groups:
        cut = full - own if own > 0 else 0
        for i in range(first, last + 1):
            invokes[i] = Window(*rows[i], cut, full)
        whole.append(Window(rows[first][0], rows[last][1], cut, full))
    return invokes + whole


def widths_differ(graph: Graph) -> bool:
    """Whether some merged graph is narrower than the batch (its windows hide positions)."""
    owns = {own for *_, own in graph.options.get(GROUPS, ())}
    return len(owns) > 1


def _shift(x: Any, offset: int, prefix: str) -> Any:
    return renumber(x, offset, lambda ref: TensorRef(prefix + ref.key))
