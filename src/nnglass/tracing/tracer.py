"""The tracer: records a `with model.trace(...)` block into a Graph, then has it run.

Invariants:
- Recording never runs model code and never touches tensors' data.
- Each node remembers the user's file:line (the first frame outside nnglass, torch and
  installed libraries).
- On exit without an exception, the graph is submitted exactly once to the backend the
  trace was made with (`submit`), and saved proxies hold their values once the job is
  done (at once unless `blocking=False`). With an exception, nothing runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NNglassError, TraceError
from ..graph.ir import ALL_STEPS, BACKWARD, GENERATE, GET, GRAD, IMPORT, SET, TRACE, Graph, Node, Ref, Site
from .meta import Meta, Recording
from .proxy import NEVER_RAN, Proxy, Saved, Shape, finish
from .where import user_where

if TYPE_CHECKING:
    from ..runtime.backend import Backend, Job, Values
    from .envoy import TracedModel
    from .session import Session

_CURRENT: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("nnglass_tracer", default=None)
_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("nnglass_session", default=None)


def current_tracer(what: str) -> Tracer:
    tracer = _CURRENT.get()
    if tracer is None:
        raise TraceError(f"{what} is only available inside a `with model.trace(...)` block", user_where())
    return tracer


def current_session() -> Session | None:
    return _SESSION.get()


def submit(target: Tracer | Session, backend: Backend, blocking: bool) -> Job:
    """Submit a tracer's or session's graph; its saved proxies fill in when the job is
    done. Blocking: wait (Ctrl-C cancels the job: nobody would collect its values)."""
    job = backend.submit(target.graph)
    target.bind(job)
    job.on_done(target.fill)
    if blocking:
        try:
            job.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(NNglassError):
                job.cancel()
            raise
    return job


class Tracer:
    """Records one trace. Use via `model.trace(...)`, not directly."""

    def __init__(self, model: TracedModel, args: tuple, kwargs: dict, backend: Backend, mode: str = TRACE,
                 options: dict | None = None, blocking: bool = True) -> None:
        self.model = model
        self.backend = backend
        self.blocking = blocking
        self.job: Job | None = None  # the submitted job (blocking=False: `.value` after job.wait())
        self.graph = Graph(model=model.name, mode=mode, options=dict(options or {}))
        self.invoke_index: int | None = None
        self._step = 0
        self.saved: dict[int, tuple[Proxy, int]] = {}  # id(proxy) -> (proxy, node id)
        # id(tensor) -> (tensor, ref); the tensor is kept so its id cannot be reused meanwhile
        self._tensor_keys: dict[int, tuple[torch.Tensor, Any]] = {}
        self._token: contextvars.Token | None = None
        self._in_invoke = False
        self._imports: dict[tuple[int, int], Ref] = {}
        self._shape: list[tuple] = []  # per node, what a runtime plan depends on (see _shape)
        self.session = current_session()
        self._meta: Meta | None = None  # record-time metadata, made when first asked for
        self._mode: Recording | None = None  # on torch's function-mode stack during the block
        self._implicit = bool(args or kwargs)
        self.replay_edits()
        if self._implicit:
            self.graph.invokes.append(model._prepare_invoke(self, args, kwargs))

    def replay_edits(self) -> None:
        """The model's edits (`model.edit()`, tracing/edits.py) come first in every graph."""
        edits = getattr(self.model, "_edits", ())
        if edits:
            from .edits import replay

            for fragment in edits:
                replay(self, fragment)

    # --- the block ---------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        if _CURRENT.get() is not None:
            raise TraceError("traces cannot be nested; use tracer.invoke(...) or a session", user_where())
        self._token = _CURRENT.set(self)
        self._mode = Recording()
        self._mode.push()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        _CURRENT.reset(self._token)
        if self._mode is not None:
            self._mode.pop()
            self._mode = None
        if exc_type is Stop:
            if exc.tracer is not self:
                return False
        elif exc_type is not None:
            return False
        if not self.graph.invokes:
            raise TraceError("nothing to run: pass inputs to trace(...) or use tracer.invoke(...)",
                             user_where())
        self.check()
        if self._meta is not None:
            self._meta.recheck()
        saved = frozenset(node_id for _, node_id in self.saved.values())
        self.graph.plan_key = (self.graph.mode, tuple(self._shape), saved)
        if self.session is not None:
            self.session.add(self)  # runs when the session ends
            return exc_type is Stop
        submit(self, self.backend, self.blocking)
        return exc_type is Stop

    def bind(self, job: Job) -> None:
        self.job = job

    def fill(self, values: Values) -> None:
        """The job's values into the saved proxies (a value that never came raises on `.value`)."""
        for proxy, node_id in self.saved.values():
            finish(proxy, values.get(node_id, NEVER_RAN))

    @contextmanager
    def invoke(self, *args: Any, **kwargs: Any) -> Iterator[Tracer]:
        """A group of inputs batched with the others; its nodes see only its rows."""
        if self._in_invoke:
            raise TraceError("invokes cannot be nested", user_where())
        if self._implicit:
            raise TraceError("tracer.invoke(...) cannot be combined with inputs passed to "
                             "trace(...); pass all inputs through invokes", user_where())
        self._in_invoke = True
        if args or kwargs:
            self.graph.invokes.append(self.model._prepare_invoke(self, args, kwargs))
            self.invoke_index = len(self.graph.invokes) - 1
        else:
            self.invoke_index = None  # no input: sees the whole batch
        try:
            yield self
        finally:
            self._in_invoke = False
            self.invoke_index = None

    @contextmanager
    def all(self) -> Iterator[Tracer]:
        """Nodes recorded inside run at every generation step; saved values become lists."""
        with self._step_scope(ALL_STEPS):
            yield self

    @contextmanager
    def step(self, k: int) -> Iterator[Tracer]:
        """Nodes recorded inside run at generation step k (0: the prompt's forward pass)."""
        if not isinstance(k, int) or k < 0:
            raise TraceError(f"step must be an int >= 0, got {k!r}", user_where())
        with self._step_scope(k):
            yield self

    @property
    def iter(self) -> Any:
        """nnsight's spelling of steps: `with tracer.iter[:]` (every step, as `all()`),
        `with tracer.iter[k]` (as `step(k)`), `for k in tracer.iter[a:b]:` (the loop body is
        recorded once per step, in that step's scope)."""
        from .verbs import StepIndex

        return StepIndex(self)

    @contextmanager
    def _step_scope(self, step: int) -> Iterator[None]:
        previous, self._step = self._step, step
        try:
            yield
        finally:
            self._step = previous

    def cache(self, modules: list[str] | None = None, inputs: bool = False) -> dict[str, CacheEntry]:
        """Save the output (and inputs, if asked) of every module matching `modules`.

        Keys are `named_modules()` paths ("model.layers.3"); `*` matches one path
        component; None means every module. In generation, entries hold per-step lists.
        """
        tree = self.model._envoy
        patterns = [p.split(".") for p in (modules if modules is not None else ["**"])]
        out: dict[str, CacheEntry] = {}
        scope = ALL_STEPS if self.graph.mode == GENERATE else self._step
        with self._step_scope(scope):
            for path, _ in tree._module.named_modules():
                if path and any(_match(p, path.split(".")) for p in patterns):
                    site = tree.at(path)
                    out[path] = CacheEntry(site.output.save(), site.inputs_pair().save() if inputs else None)
        if modules is not None and not out:
            raise TraceError(f"no module matches {modules!r}", user_where())
        return out

    def stop(self) -> None:
        """End the block here (nnsight's `tracer.stop()`): nothing after this line is
        recorded, and the forward pass stops once what was recorded has run."""
        raise Stop(self)

    def metadata(self) -> Meta:
        """Shapes, dtypes and types of this trace's values (computed when first asked)."""
        if self._meta is None:
            self._meta = Meta(self)
        return self._meta

    # --- recording ---------------------------------------------------------------------
    def where(self) -> str:
        return user_where()

    def record(self, op: str, args: tuple = (), kwargs: dict | None = None,
               site: Site | None = None) -> Proxy:
        current = _CURRENT.get()
        if current is not None and current is not self:
            return current.record(op, args, kwargs, site)  # an earlier trace's value, used later
        encode = self.encode
        args = tuple([encode(a) for a in args]) if args else ()
        kwargs = {k: encode(v) for k, v in kwargs.items()} if kwargs else {}
        nodes = self.graph.nodes
        node_id = len(nodes)  # after encoding: encoding may add `import` nodes
        node = Node(node_id, op, args, kwargs, site, self.invoke_index, self._step, False, user_where())
        nodes.append(node)
        self._shape.append(_shape(node))
        return Proxy(self, node_id)

    def record_inplace(self, proxy: Proxy, op: str, args: tuple, kwargs: dict | None = None) -> Proxy:
        """An in-place edit: the proxy now stands for the edited value."""
        new = self.record(op, args, kwargs)
        proxy._tracer, proxy._id = new._tracer, new._id
        return proxy

    def record_site(self, op: str, path: str, kind: str, call: int, value: Any = None,
                    skip: bool = False) -> Proxy:
        site = Site(path, kind, call, self._step)
        return self.record(op, () if op == GET else (value,), {"skip": True} if skip else None, site)

    def record_backward(self, proxy: Proxy, gradient: Any) -> int:
        args = (proxy,) if gradient is None else (proxy, gradient)
        return self.record(BACKWARD, args)._id

    def take_last(self, node_id: int) -> Node:
        """Remove node `node_id`, which must be the last one recorded (nothing refers to it
        yet): a `with loss.backward():` block moves its backward to where the block ends."""
        if not self.graph.nodes or self.graph.nodes[-1].id != node_id:
            raise TraceError("`with x.backward():` must directly follow the backward it blocks", user_where())
        self._shape.pop()
        return self.graph.nodes.pop()

    def put_back(self, node: Node) -> None:
        """Record `node` again, now as the last node (same op, arguments and scope)."""
        node.id = len(self.graph.nodes)
        self.graph.nodes.append(node)
        self._shape.append(_shape(node))

    def mark_saved(self, proxy: Proxy) -> None:
        self.graph.nodes[proxy._id].save = True
        self.saved[id(proxy)] = (proxy, proxy._id)

    def encode(self, x: Any) -> Any:
        """A user value as graph data: proxies → Refs, tensors → attachments."""
        t = type(x)
        if t is Proxy:
            if x._tracer is not self:
                return self._import(x)
            return Ref(x._id)
        if t in (int, float, bool, str) or x is None or x is Ellipsis:
            return x
        if t is Saved:
            return self.encode(x.value)
        if isinstance(x, torch.Tensor):
            entry = self._tensor_keys.get(id(x))
            if entry is None or entry[0] is not x:
                # Contiguous, as the wire carries it: a strided view (a weight's slice) would
                # otherwise round differently here than after a round trip or on a server.
                entry = self._tensor_keys[id(x)] = (x, self.graph.attach(x.detach().contiguous()))
            return entry[1]
        if t is tuple or t is list or t is Shape or isinstance(x, torch.Size):
            items = [self.encode(y) for y in x]
            return torch.Size(items) if t is Shape or isinstance(x, torch.Size) else t(items)
        if t is dict:
            return {str(k): self.encode(v) for k, v in x.items()}
        if t is slice:
            return slice(self.encode(x.start), self.encode(x.stop), self.encode(x.step))
        if isinstance(x, (torch.dtype, torch.device)):
            return x
        raise TraceError(f"a {t.__name__} cannot be part of a graph (only tensors, numbers, "
                         "strings, None, slices and lists/tuples/dicts of them)", user_where())

    def _import(self, proxy: Proxy) -> Ref:
        """A value from an earlier trace of this session."""
        if self.session is None or proxy._tracer.session is not self.session:
            raise TraceError("a value from another trace cannot be used here; save it and "
                             "use it after that trace, or put both traces in a session", user_where())
        key = (self.session.index(proxy._tracer), proxy._id)
        ref = self._imports.get(key)
        if ref is None:
            node = self.graph.add(IMPORT, key, where=user_where())
            ref = self._imports[key] = Ref(node.id)
        return ref

    def check(self) -> None:
        """Checks that need the whole graph: .grad must come before its backward."""
        nodes = self.graph.nodes
        last_backward = max((n.id for n in nodes if n.op == BACKWARD), default=-1)
        for n in nodes:
            if n.op == GRAD and n.id > last_backward:
                raise TraceError(
                    "`.grad` is declared after the last `.backward()` (or with none): "
                    "declare it before the backward that produces it", n.where)
            if n.op == SET and n.site is not None and n.site.kind == "result":
                raise TraceError("the generated result cannot be set", n.where)


def _shape(node: Node) -> tuple:
    """Everything about a node a runtime plan depends on: its op and site, where its
    references stand among its arguments, and an int index (gradients of tuple parts)."""
    args = node.args
    if not args and not node.kwargs:
        return (node.op, node.site, node.invoke, node.step)
    refs = tuple([a.id if type(a) is Ref else -1 for a in args])
    nested = node.kwargs or any(type(a) in (tuple, list, dict, slice) for a in args)
    extra = tuple(node.refs()) if nested else None
    index = args[1] if node.op == "operator.getitem" and len(args) > 1 and type(args[1]) is int else None
    return (node.op, node.site, node.invoke, node.step, refs, extra, index)


class Stop(Exception):
    """`tracer.stop()`: leaves the block; the tracer that raised it catches it."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__("tracer.stop() outside its trace")
        self.tracer = tracer


class CacheEntry:
    """One module's cached values: `.output`, and `.inputs` when asked for."""

    __slots__ = ("_inputs", "output")

    def __init__(self, output: Proxy, inputs: Proxy | None) -> None:
        self.output = output
        self._inputs = inputs

    @property
    def inputs(self) -> Any:
        if self._inputs is None:
            raise TraceError("inputs were not cached: use tracer.cache(..., inputs=True)", user_where())
        return self._inputs


def _match(pattern: list[str], parts: list[str]) -> bool:
    if pattern == ["**"]:
        return True
    return len(pattern) == len(parts) and all(p == "*" or p == q for p, q in zip(pattern, parts))
