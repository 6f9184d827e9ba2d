"""Backends execute a graph and return its saved values: one narrow interface.

`LocalBackend` runs in this process; `nnglass.remote.RemoteBackend` sends the graph to a
server. Tracers never branch on which one they have.
"""

from __future__ import annotations

from typing import Any, Protocol

from .. import _config
from ..graph.ir import Graph


class Runnable(Protocol):
    """A model that can run a graph in-process (NNModel, LanguageModel)."""

    def run_graph(self, graph: Graph) -> dict[int, Any]: ...


class Backend(Protocol):
    def execute(self, graph: Graph) -> dict[int, Any]: ...


class LocalBackend:
    """Runs the in-memory graph; with NNGLASS_ROUNDTRIP=1, after a JSON round trip."""

    def __init__(self, model: Runnable, roundtrip: bool | None = None) -> None:
        self.model = model
        self.roundtrip = _config.roundtrip() if roundtrip is None else roundtrip

    def execute(self, graph: Graph) -> dict[int, Any]:
        if self.roundtrip:
            from ..graph import wire

            graph = wire.roundtrip(graph)
        return self.model.run_graph(graph)
