"""Sessions: several traces recorded as one unit of work (one request when remote).

Inner traces do not run when their block ends; they run, in order, when the session
ends. A trace may use an earlier trace's values directly (no `.save()` needed): the
use becomes an `import` node. Only saved values come back; `.value` inside the session
raises, since nothing has run yet.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from ..errors import TraceError
from ..graph.ir import Graph
from .proxy import NEVER_RAN, finish
from .tracer import _SESSION, Tracer, user_where

if TYPE_CHECKING:
    from .envoy import TracedModel


class Session:
    """Use via `model.session()`: `with lm.session(): with lm.trace(...): ...`."""

    def __init__(self, model: TracedModel, remote: bool = False, blocking: bool = True) -> None:
        self.model = model
        self.remote = remote
        self.blocking = blocking
        self.job: Any = None  # with remote=True, blocking=False: the submitted job
        self.tracers: list[Tracer] = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Session:
        if _SESSION.get() is not None:
            raise TraceError("sessions cannot be nested", user_where())
        self._token = _SESSION.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        _SESSION.reset(self._token)
        if exc_type is not None or not self.tracers:
            return False
        self.graph = Graph(model=self.model.name, mode="session",
                           children=[t.graph for t in self.tracers])  # fmt: skip
        if self.remote and not self.blocking:
            self.job = self.model._submit(self)  # one request; proxies fill in on job.wait()
            return False
        results = self.model._execute(self.graph, remote=self.remote)
        for k, tracer in enumerate(self.tracers):
            values = results.get(k, {})
            for proxy, node_id in tracer.saved.values():
                finish(proxy, values.get(node_id, NEVER_RAN))
        return False

    def add(self, tracer: Tracer) -> None:
        if tracer.model is not self.model:
            raise TraceError("every trace in a session must use the session's model", user_where())
        self.tracers.append(tracer)

    def index(self, tracer: Tracer) -> int:
        for k, t in enumerate(self.tracers):
            if t is tracer:
                return k
        raise TraceError("a value from a trace outside this session cannot be used here", user_where())
