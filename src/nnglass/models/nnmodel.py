"""NNModel: any torch.nn.Module, traced.

Invokes are batched by concatenating tensor arguments on dim 0 (each invoke's rows are
remembered); non-tensor arguments must be equal across invokes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError
from ..graph.ir import SESSION, Graph, Invoke, TensorRef
from ..runtime.backend import Backend, LocalBackend
from ..runtime.interpreter import Interpreter
from ..runtime.limits import NO_LIMITS, RunConfig, RunLimits
from ..runtime.order import OrderLog
from ..runtime.run import execute, run_session
from ..runtime.values import resolve
from ..tracing.edits import EditTracer
from ..tracing.envoy import Aliases, Envoy
from ..tracing.session import Session
from ..tracing.tracer import Tracer, user_where
from . import fake


class NNModel:
    """Wraps (does not copy) a module. `with net.trace(x): net.layer.output.save()`."""

    def __init__(self, module: torch.nn.Module, name: str | None = None, *,
                 backend: Backend | None = None, rename: dict[str, str] | None = None) -> None:
        """`backend`: where `remote=True` runs (default: none for a plain module; a
        LanguageModel uses the configured server). `rename`: aliases for module paths or
        names, e.g. `{"transformer.h": "layers", "attn": "attention"}` (tracing/envoy.py)."""
        object.__setattr__(self, "_module", module)
        aliases = Aliases(module, rename) if rename else None
        object.__setattr__(self, "_envoy", Envoy(module, "", aliases, self._source_listing))
        object.__setattr__(self, "name", name or type(module).__name__)
        object.__setattr__(self, "_local", LocalBackend(self))
        object.__setattr__(self, "_remote", backend)
        object.__setattr__(self, "_order", OrderLog())  # site orders seen, for early out-of-order errors
        object.__setattr__(self, "_fake_mode", None)  # record-time metadata: made when first asked
        object.__setattr__(self, "_fake_sites", fake.FakeCache())
        object.__setattr__(self, "_edits", ())  # model.edit() fragments, replayed into every trace

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped torch module itself."""
        return self._module

    def trace(self, *args: Any, remote: bool = False, blocking: bool = True, **kwargs: Any) -> Tracer:
        """Record the block; on exit run it with `args`/`kwargs` as the forward's inputs."""
        return Tracer(self, args, kwargs, self._backend(remote), blocking=blocking)

    def session(self, remote: bool = False, blocking: bool = True) -> Session:
        """Several traces as one unit (one request when remote); later traces may use
        earlier traces' values."""
        return Session(self, self._backend(remote), blocking=blocking)

    def edit(self, inplace: bool = False) -> EditTracer:
        """Record interventions that apply to every later trace (nnsight's `model.edit()`):
        `with net.edit() as edited:` gives a second handle on the same module carrying the
        edits; `inplace=True` edits this model. The edits travel inside each graph sent (a
        server never keeps them). Nothing is saved or run in the block."""
        return EditTracer(self, inplace)

    def clear_edits(self) -> None:
        """Forget this model's edits: later traces run without them."""
        object.__setattr__(self, "_edits", ())

    def _backend(self, remote: bool = False) -> Backend:
        """Where this model's graphs run: in this process, or (remote) on a server."""
        if not remote:
            return self._local
        if self._remote is None:
            raise TraceError("remote=True is for models a server hosts: use LanguageModel(name)",
                             user_where())
        return self._remote

    # --- what Tracer needs ---------------------------------------------------------------
    def _prepare_invoke(self, tracer: Tracer, args: tuple, kwargs: dict) -> Invoke:
        encode = tracer.encode
        invoke = Invoke(tuple(encode(a) for a in args), {k: encode(v) for k, v in kwargs.items()})
        if tracer.graph.invokes:
            _check_batchable(tracer.graph.invokes[0], invoke)
        return invoke

    def _fake_world(self, graph: Graph) -> fake.FakeWorld:
        """Site values of a fake forward on the graph's invokes (record-time metadata)."""
        args, kwargs, rows, batch = batch_invokes(graph)
        module, mode = self._module, self._meta_mode()
        key = fake.signature((args, kwargs))

        def sites(later: bool, ops: bool) -> fake.SiteValues:
            def make() -> fake.SiteValues:
                return fake.capture(mode, module, lambda: module(*args, **kwargs), ops)

            return self._fake_sites.get((key, ops), make)

        return fake.FakeWorld(mode, module, sites, rows, batch)

    def _source_listing(self, path: str) -> list[str] | None:
        """`.source` operations outside a trace: a plain module's inputs are unknown then."""
        return None

    def _meta_mode(self) -> Any:
        """The FakeTensorMode this model's own module runs under for metadata."""
        if self._fake_mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            object.__setattr__(self, "_fake_mode", FakeTensorMode(allow_non_fake_inputs=True))
        return self._fake_mode

    # --- running (also what a server calls) ---------------------------------------------
    def run_graph(self, graph: Graph, imports: dict | None = None,
                  limits: RunLimits = NO_LIMITS) -> dict[int, Any]:
        if graph.mode == SESSION:
            return run_session(self, graph, limits)
        args, kwargs, rows, batch = batch_invokes(graph)
        module = self._module

        def forward(interp: Interpreter) -> Any:
            return module(*args, **kwargs)

        return execute(graph, module, forward, rows, batch, RunConfig(limits), imports=imports,
                       order=self._order)

    # --- the module tree ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        found = getattr(self._envoy, name)
        if type(found) is Envoy:
            self.__dict__[name] = found  # next time a plain attribute hit
        return found

    def __getitem__(self, index: int) -> Envoy:
        return self._envoy[index]

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._envoy, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module!r})"

    def _repr_html_(self) -> str | None:
        """Jupyter: the module tree, collapsible (nnglass[viz]; without it, the plain repr)."""
        try:
            from ..viz import module_tree
        except ModuleNotFoundError:
            return None
        return module_tree(self).text


def batch_invokes(graph: Graph) -> tuple[tuple, dict, list[tuple[int, int]], int]:
    """Concatenate the invokes' tensor arguments on dim 0; return args, kwargs, rows, batch."""
    invokes = [
        (resolve(inv.args, [], graph.tensors), resolve(inv.kwargs, [], graph.tensors))
        for inv in graph.invokes
    ]
    if len(invokes) == 1:
        args, kwargs = invokes[0]
        n = _batch_size(args, kwargs)
        return args, kwargs, [(0, n)], n
    first_args, first_kwargs = invokes[0]
    for a, k in invokes[1:]:
        if len(a) != len(first_args) or set(k) != set(first_kwargs):
            raise TraceError("every invoke must pass the same arguments (tensors are batched on dim 0)")
    rows, start = [], 0
    for a, k in invokes:
        n = _batch_size(a, k)
        rows.append((start, start + n))
        start += n
    args = tuple(_merge([a[i] for a, _ in invokes]) for i in range(len(first_args)))
    kwargs = {name: _merge([k[name] for _, k in invokes]) for name in first_kwargs}
    return args, kwargs, rows, start


def _check_batchable(first: Invoke, new: Invoke) -> None:
    """Invokes are batched on dim 0: same arguments, equal non-tensor values."""
    if len(first.args) != len(new.args) or set(first.kwargs) != set(new.kwargs):
        raise TraceError("every invoke must pass the same arguments (tensors are batched on dim 0): "
                         f"first invoke {len(first.args)} positional + {sorted(first.kwargs)}, this one "
                         f"{len(new.args)} positional + {sorted(new.kwargs)}", user_where())
    pairs = [*zip(first.args, new.args), *((first.kwargs[k], new.kwargs[k]) for k in new.kwargs)]
    for a, b in pairs:
        if (type(a) is TensorRef) != (type(b) is TensorRef) or (type(a) is not TensorRef and a != b):
            raise TraceError(f"non-tensor arguments must be equal across invokes: {a!r} vs {b!r}",
                             user_where())


def _merge(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values, dim=0)
    if any(v != values[0] for v in values[1:]):
        raise TraceError(f"non-tensor arguments must be equal across invokes: {values!r}")
    return values[0]


def _batch_size(args: tuple, kwargs: dict) -> int:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


