"""Out-of-order detection before the model runs, from site orders seen in earlier runs.

A setter at site S whose value comes from a getter at site T can only work if T fires
before S. The order of sites is a property of the model and its inputs' shapes, which a
previous run (or a scan) has shown: `OrderLog` keeps the last few firing sequences and
refuses such a graph before any hook is installed, naming both lines. Where the order
is not known yet, the interpreter still catches it at the moment it happens.
"""

from __future__ import annotations

from ..errors import OutOfOrderError
from ..graph.ir import GET, SET, Graph, Node
from .plan import Plan, SiteKey, site_key

_KEEP = 4


class OrderLog:
    """What earlier runs of one model showed: firing sequences of its sites, and whether
    the model edits module outputs in place after they are produced (then saves are
    copied from the start; see Interpreter.copy_saves). Thread-safe enough: it only
    appends, replaces and sets a flag."""

    def __init__(self) -> None:
        self._seen: list[dict[SiteKey, int]] = []
        self.edits_outputs = False

    def record(self, fired: list[SiteKey]) -> None:
        if len(fired) < 2:
            return
        order = {key: i for i, key in reversed(list(enumerate(fired)))}
        self._seen = [order, *[s for s in self._seen if s.keys() != order.keys()]][:_KEEP]

    def check(self, plan: Plan, graph: Graph) -> None:
        seen = self._seen
        if not seen:
            return
        nodes = graph.nodes
        for task in plan.tasks.values():
            for i in task.ids:
                if nodes[i].op == SET:
                    self._check_setter(plan, nodes, nodes[i], seen)

    @staticmethod
    def _check_setter(plan: Plan, nodes: list[Node], setter: Node, seen: list[dict[SiteKey, int]]) -> None:
        target = site_key(setter)
        stack, visited = list(plan.deps[setter.id]), set()
        while stack:
            i = stack.pop()
            if i in visited:
                continue
            visited.add(i)
            node = nodes[i]
            if node.op == GET:
                source = site_key(node)
                for order in seen:
                    if source in order and target in order and order[source] > order[target]:
                        raise OutOfOrderError(
                            f"this sets `{target[0] or '<root>'}.{target[1]}` from "
                            f"`{source[0] or '<root>'}.{source[1]}` (line {node.where}), which "
                            "the model computes later (seen in an earlier run): values can only "
                            "flow forward through the model",
                            setter.where,
                        )
            else:
                stack.extend(plan.deps[i])
