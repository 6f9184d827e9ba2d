"""Record-time metadata: a proxy's shape, dtype, device and Python type while recording.

Values come from fake tensors: the model's own forward on fake inputs of the trace's
input shapes gives every site's value (the model provides it, `_fake_world(graph)`,
cached per input signature), and every other node is its op applied to fake values.

Invariants:
- Lazy: nothing here runs until code asks a proxy for metadata. A trace that never asks
  has `tracer._meta is None`, runs no fake forward and pushes no torch function mode.
- Each node's fake value is computed at most once per trace (and per generation-step
  variant); no answer depends on the data. A value whose metadata would depend on the
  data (`.item()`, `nonzero()`) or whose op fails on these shapes is `Unknown`, and
  asking it raises a TraceError that says why.
- `isinstance(p, torch.Tensor)` is True only while a trace records, and then a
  TorchFunctionMode (`Recording`, pushed by the tracer for its block) routes every torch
  call with a proxy among its arguments to the tracer first: torch's C code would
  otherwise take a proxy for a real tensor (`torch.tensor(p)` would crash).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .._function_modes import StackedMode
from ..errors import TraceError
from ..graph.ir import (
    ALL_STEPS,
    BACKWARD,
    GENERATE,
    GET,
    GRAD,
    IMPORT,
    MODULE,
    PARAM,
    SET,
    SET_GRAD,
    Node,
    Ref,
    TensorRef,
    find,
)
from ..graph.ops import REGISTRY

if TYPE_CHECKING:
    from ..graph.ir import Site
    from .tracer import Tracer


class Unknown:
    """A fake value that cannot be known while recording, and why."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<unknown: {self.why}>"


class FakeWorld(Protocol):
    """What a model provides for one input signature (see models/fake.py)."""

    def mode(self) -> Any:
        """A context manager: the FakeTensorMode ops on fake values run under."""

    def site(self, site: Site, invoke: int | None, later: bool) -> Any:
        """The fake value of a site for an invoke's rows (later: a generation step > 0)."""

    def module(self, path: str, args: tuple, kwargs: dict) -> Any: ...

    def param(self, path: str) -> Any: ...


_NO_VALUE = (SET, SET_GRAD, BACKWARD)


class Meta:
    """The fake values of one tracer's nodes, computed on demand."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._values: tuple[dict[int, Any], dict[int, Any]] = ({}, {})  # variant -> node -> value
        self._world: FakeWorld | None = None
        self._world_invokes = -1
        self._sets: dict[tuple, list[int]] = {}  # (site, invoke) -> set node ids
        self._indexed = 0
        # (node id, what, get, answer, where, invokes recorded then): see `recheck`
        self.answers: list[tuple[int, str, Any, Any, str, int]] = []

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Fake forwards and ops run without the recording mode (they have no proxies; it
        would only cost a Python call per torch op)."""
        mode = self.tracer._mode
        n = torch._C._len_torch_function_stack()
        if mode is None or not n or torch._C._get_function_stack_at(n - 1) is not mode:
            yield
            return
        torch._C._pop_torch_function_stack()
        try:
            yield
        finally:
            torch._C._push_on_torch_function_stack(mode)

    # --- values ------------------------------------------------------------------------
    def of(self, node_id: int) -> list[Any]:
        """The node's fake value per generation-step variant it runs in (one for a plain
        trace; step 0 and a later step inside `tracer.all()`)."""
        node = self.tracer.graph.nodes[node_id]
        if self.tracer.graph.mode != GENERATE or node.step == 0:
            variants = (0,)
        elif node.step == ALL_STEPS:
            variants = (0, 1)
        else:
            variants = (1,)
        with self._quiet():
            return [self._eval(node_id, v) for v in variants]

    def recheck(self) -> None:
        """An answer given while fewer invokes were recorded must hold for all of them: a
        later, longer prompt widens every row (left padding), so a width read in an early
        invoke can go stale. Checked once the block ends, on a fresh fake forward, and only
        for answers given before the last invoke was recorded."""
        n = len(self.tracer.graph.invokes)
        stale = [a for a in self.answers if a[5] != n]
        if not stale:
            return
        fresh = Meta(self.tracer)
        for node_id, what, get, answer, where, _ in stale:
            try:
                now = get(fresh.of(node_id)[0])
            except Exception:  # unknown now as well: the run will say why, if it matters
                continue
            if now != answer:
                raise TraceError(
                    f"the {what} read here ({answer}) is {now} once every invoke is recorded: a later "
                    "invoke's longer prompt widens the batch (left padding); read it after the last "
                    "invoke, or put the longest prompt first",
                    where,
                )

    def world(self) -> FakeWorld:
        graph = self.tracer.graph
        if self._world is None or len(graph.invokes) != self._world_invokes:
            if not graph.invokes:
                raise TraceError("a value's shape, dtype and type come from the trace's inputs: pass "
                                 "inputs to trace(...) or ask inside an invoke that has some",
                                 self.tracer.where())
            make = getattr(self.tracer.model, "_fake_world", None)
            if make is None:
                raise TraceError(f"{type(self.tracer.model).__name__} cannot tell shapes while recording",
                                 self.tracer.where())
            self._world = make(graph)
            self._world_invokes = len(graph.invokes)
        return self._world

    def _eval(self, node_id: int, v: int) -> Any:
        table = self._values[v]
        if node_id in table:
            return table[node_id]
        nodes = self.tracer.graph.nodes
        need, stack = set(), [node_id]
        while stack:  # the not yet computed part of its dependency closure
            j = stack.pop()
            if j in table or j in need:
                continue
            need.add(j)
            stack.extend(nodes[j].refs())
            if nodes[j].op == GET:
                s = self._last_set(nodes[j])
                if s is not None:
                    stack.extend(s.refs())
        for j in sorted(need):
            table[j] = self._compute(nodes[j], v, table)
        return table[node_id]

    def _last_set(self, node: Node) -> Node | None:
        nodes = self.tracer.graph.nodes
        for n in nodes[self._indexed :]:
            if n.op == SET:
                self._sets.setdefault((n.site, n.invoke), []).append(n.id)
        self._indexed = len(nodes)
        ids = [i for i in self._sets.get((node.site, node.invoke), ()) if i < node.id]
        return nodes[ids[-1]] if ids else None

    def _compute(self, node: Node, v: int, table: dict[int, Any]) -> Any:
        op = node.op
        if op in _NO_VALUE:
            return None
        if op == GET:
            s = self._last_set(node)
            if s is not None:  # a later read of an edited site sees the edit
                return self._resolve(s.args[0], table)
            return self.world().site(node.site, node.invoke, later=v == 1)
        if op == GRAD:
            return table[node.args[0].id]
        if op == IMPORT:
            k, i = node.args
            session = self.tracer.session
            return session.tracers[k].metadata()._eval(i, v) if session is not None else Unknown("import")
        args = self._resolve(node.args, table)
        kwargs = self._resolve(node.kwargs, table)
        unknown = _first_unknown((args, kwargs))
        if unknown is not None:
            return unknown
        world = self.world()
        try:
            with world.mode():
                if op == MODULE:
                    return world.module(args[0], args[1:], kwargs)
                if op == PARAM:
                    return world.param(args[0])
                fn = REGISTRY.get(op)
                return Unknown(f"{op} is not a registered op") if fn is None else fn(*args, **kwargs)
        except Exception as e:  # the real run will say it again, at the node's line
            return Unknown(f"`{op}` gives no value on these shapes ({type(e).__name__}: {e})")

    def _resolve(self, x: Any, table: dict[int, Any]) -> Any:
        t = type(x)
        if t is Ref:
            return table[x.id]
        if t is TensorRef:
            return self.tracer.graph.tensors[x.key]
        if t is tuple or t is list:
            return t([self._resolve(y, table) for y in x])
        if t is dict:
            return {k: self._resolve(y, table) for k, y in x.items()}
        if t is slice:
            r = self._resolve
            return slice(r(x.start, table), r(x.stop, table), r(x.step, table))
        return x


def _first_unknown(x: Any) -> Unknown | None:
    return find(x, Unknown)


class Recording(StackedMode):
    """Active while a trace records: torch calls with a proxy among their arguments are
    recorded; others run as usual."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        from .proxy import Proxy, has_proxy

        kwargs = kwargs or {}
        if has_proxy(args) or has_proxy(kwargs):
            return Proxy.__torch_function__(func, types, args, kwargs)
        return func(*args, **kwargs)


# --- answers, per proxy -------------------------------------------------------------------


def values(proxy: Any) -> list[Any]:
    return proxy._tracer.metadata().of(proxy._id)


def note(proxy: Any, what: str, get: Any, answer: Any, invokes: int) -> None:
    """Remember an answer the user's code took (see `Meta.recheck`): `invokes` were recorded
    when it was computed."""
    m = proxy._tracer.metadata()
    m.answers.append((proxy._id, what, get, answer, proxy._tracer.where(), invokes))


def _one(proxy: Any, what: str, get: Any, noted: bool = True) -> Any:
    """`get(value)` for each variant the proxy runs in; they must agree. `noted`: the answer
    is remembered for `Meta.recheck` (a `Shape` instead notes the parts that are read)."""
    answers = []
    for value in values(proxy):
        if type(value) is Unknown:
            raise TraceError(f"the {what} of this value is not known while recording: {value.why}",
                             proxy._tracer.where())
        answers.append(get(value))
    if noted:
        note(proxy, what, get, answers[0], proxy._tracer.metadata()._world_invokes)
    if any(a != answers[0] for a in answers[1:]):
        raise TraceError(
            f"the {what} of this value differs between generation steps inside tracer.all() "
            f"({answers[0]} at step 0, {answers[1]} after, with the KV cache): read it inside "
            "tracer.step(k), or use only what does not change (h.size(-1), index with -1)",
            proxy._tracer.where(),
        )
    return answers[0]


def _tensor(proxy: Any, what: str, get: Any, noted: bool = True) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            raise TraceError(f"this value is a {type(value).__name__}, not a tensor: it has no {what}",
                             proxy._tracer.where())
        return get(value)

    return _one(proxy, what, check, noted)


def shape(proxy: Any, noted: bool = True) -> torch.Size:
    return _tensor(proxy, "shape", lambda t: torch.Size(t.shape), noted)


def dtype(proxy: Any) -> torch.dtype:
    return _tensor(proxy, "dtype", lambda t: t.dtype)


def device(proxy: Any) -> torch.device:
    return _tensor(proxy, "device", lambda t: t.device)


def size(proxy: Any, dim: int | None = None) -> Any:
    if dim is None:
        return shape(proxy)
    return _tensor(proxy, f"size of dim {dim}", lambda t: int(t.shape[dim]))


def length(proxy: Any) -> int:
    def get(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                raise TraceError("len() of a 0-d tensor", proxy._tracer.where())
            return int(value.shape[0])
        try:
            return len(value)
        except TypeError:
            raise TraceError(f"this value is a {type(value).__name__}: it has no len()",
                             proxy._tracer.where()) from None

    return _one(proxy, "length", get)


def keys(proxy: Any) -> list[Any]:
    """The keys of a dict-like value (a ModelOutput), for iteration."""
    return _one(proxy, "keys", lambda value: list(value.keys()))


def recording() -> bool:
    """Whether a `Recording` mode is on this thread's torch function stack."""
    n = torch._C._len_torch_function_stack()
    return any(type(torch._C._get_function_stack_at(i)) is Recording for i in range(n - 1, -1, -1))


def python_type(proxy: Any) -> type:
    """What `isinstance` and `type`-checking code should see; the proxy's own class where
    the value is not known (data-dependent, or model state) or no trace is recording."""
    if not recording():
        return type(proxy)
    value = values(proxy)[0]
    if type(value) is Unknown:
        return type(proxy)
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    return type(value)


