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
from ..graph.ir import SESSION, Graph
from .tracer import _SESSION, Tracer, submit, user_where

if TYPE_CHECKING:
    from ..runtime.backend import Backend, Job, Values
    from .envoy import TracedModel


class Session:
    """Use via `model.session()`: `with lm.session(): with lm.trace(...): ...`."""

    def __init__(self, model: TracedModel, backend: Backend, blocking: bool = True) -> None:
        self.model = model
        self.backend = backend
        self.blocking = blocking
        self.job: Job | None = None  # the submitted job (one for all its traces)
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
        self.graph = Graph(model=self.model.name, mode=SESSION,
                           children=[t.graph for t in self.tracers])
        submit(self, self.backend, self.blocking)
        return False

    def bind(self, job: Job) -> None:
        self.job = job
        for tracer in self.tracers:
            tracer.bind(job)

    def fill(self, values: Values) -> None:
        """Each trace's values (by trace index) into its saved proxies."""
        for k, tracer in enumerate(self.tracers):
            tracer.fill(values.get(k, {}))

    def add(self, tracer: Tracer) -> None:
        if tracer.model is not self.model:
            raise TraceError("every trace in a session must use the session's model", user_where())
        self.tracers.append(tracer)

    def index(self, tracer: Tracer) -> int:
        for k, t in enumerate(self.tracers):
            if t is tracer:
                return k
        raise TraceError("a value from a trace outside this session cannot be used here", user_where())
