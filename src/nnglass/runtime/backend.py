"""Backends: where a graph runs. One narrow interface, `Backend.submit(graph) -> Job`.

`LocalBackend` runs the graph in this process and returns a job that has already
finished; `nnglass.remote.RemoteBackend` sends it to a server and returns a job that
finishes there; `Recorder` keeps the graph and runs nothing (to inspect, store or send a
graph yourself). Tracers and sessions submit, then wait unless `blocking=False`: they
never branch on which backend they have.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Protocol

from .. import _config
from ..errors import NNglassError
from ..graph.ir import Graph
from .limits import NO_LIMITS, RunLimits

Values = dict[int, Any]  # saved values by node id (a session: by trace index, then node id)


class Job(Protocol):
    """A submitted graph."""

    id: str

    def status(self) -> str:
        """RECEIVED, QUEUED, RUNNING, COMPLETED, ERROR or CANCELLED."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the values are here; raise the job's error if it failed."""

    def result(self, timeout: float | None = None) -> Values: ...

    def cancel(self) -> str: ...

    def on_done(self, callback: Callable[[Values], Any]) -> None:
        """Call `callback(values)` once the values are here (now, if they already are)."""


class Backend(Protocol):
    def submit(self, graph: Graph) -> Job: ...


class Runnable(Protocol):
    """A model that can run a graph in-process (NNModel, LanguageModel)."""

    def run_graph(self, graph: Graph, imports: dict | None = None, limits: RunLimits = NO_LIMITS) -> Values:
        """Run `graph` here (`imports`: a session's earlier values; `limits`: a server's)."""


_IDS = itertools.count()


class DoneJob:
    """A job that finished as it was made: a local run's values."""

    def __init__(self, values: Values) -> None:
        self.id = f"local-{next(_IDS)}"
        self._values = values

    def __repr__(self) -> str:
        return f"DoneJob({self.id!r})"

    def status(self) -> str:
        return "COMPLETED"

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None) -> Values:
        return self._values

    def cancel(self) -> str:
        return "COMPLETED"

    def on_done(self, callback: Callable[[Values], Any]) -> None:
        callback(self._values)


class LocalBackend:
    """Runs the in-memory graph; with NNGLASS_ROUNDTRIP=1, after a JSON round trip.
    A failure raises from `submit`, at once, like the run itself would. `limits`: run
    as a server would (time, sizes, hidden weights), e.g. as a model's `backend=` in tests."""

    def __init__(self, model: Runnable, roundtrip: bool | None = None, limits: RunLimits = NO_LIMITS) -> None:
        self.model = model
        self.roundtrip = _config.roundtrip() if roundtrip is None else roundtrip
        self.limits = limits

    def submit(self, graph: Graph) -> DoneJob:
        if self.roundtrip:
            from ..graph import wire

            graph = wire.roundtrip(graph)
        return DoneJob(self.model.run_graph(graph, limits=self.limits))


class RecordedJob:
    """A graph that was recorded, not run: its saved values never come."""

    def __init__(self, graph: Graph) -> None:
        self.id = f"recorded-{next(_IDS)}"
        self.graph = graph

    def __repr__(self) -> str:
        return f"RecordedJob({self.id!r})"

    def status(self) -> str:
        return "RECORDED"

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None) -> Values:
        raise NNglassError("this graph was only recorded (nnglass.Recorder): it never ran")

    def cancel(self) -> str:
        return "RECORDED"

    def on_done(self, callback: Callable[[Values], Any]) -> None:
        return None  # never: saved proxies stay unfilled


class Recorder:
    """A backend that runs nothing and keeps every graph submitted to it, in order.

        rec = nnglass.Recorder()
        net = nnglass.NNModel(module, backend=rec)   # where remote=True goes
        with net.trace(x, remote=True):
            net.layers[0].output.save()
        graph = rec.last                              # the recorded intervention graph
    """

    def __init__(self) -> None:
        self.graphs: list[Graph] = []

    @property
    def last(self) -> Graph:
        if not self.graphs:
            raise NNglassError("nothing recorded yet: trace with remote=True on a model built "
                               "with backend=this recorder")
        return self.graphs[-1]

    def submit(self, graph: Graph) -> RecordedJob:
        self.graphs.append(graph)
        return RecordedJob(graph)
