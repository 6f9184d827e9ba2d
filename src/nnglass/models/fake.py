"""Fake tensors: scanning a graph, and the site values record-time metadata reads.

Fake tensors carry shapes, dtypes and devices but no data. A scan runs a graph against a
fake-tensor copy of the model, so it finds shape and index errors at the user's line in
milliseconds, before (and without) loading weights. A `FakeWorld` is one fake forward
with every module's inputs and output captured: what a proxy's `.shape` or
`isinstance(...)` answers while a trace records (tracing/meta.py).

Invariants:
- The fake model is built once per LanguageModel from its config (scans; metadata where
  the meta-device forward of models/metaforward.py cannot run); a loaded model where that
  forward cannot run, and any NNModel's module, run their own forward under the model's
  one FakeTensorMode: parameters are read as fake copies, never written.
- One capture per input signature (input shapes and dtypes, forward options, generation
  step kind), kept by the model (`_FakeCache`); a trace that never asks builds none.
- Capture hooks act only for the capture running in this context, and are removed in a
  `finally`, so a real run of the same module in another thread never sees them.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..graph.ir import GENERATE, SCAN, Graph, Site
from ..graph.source import split as split_source
from ..runtime.interpreter import Interpreter
from ..runtime.limits import NO_LIMITS, RunConfig, RunLimits
from ..runtime.run import execute
from ..runtime.values import Opaque, graph_view, map_batch, without_state
from ..tracing.meta import Unknown
from .source_notes import OpNotes

if TYPE_CHECKING:
    from .language import LanguageModel


def _fake_model(lm: LanguageModel) -> tuple[FakeTensorMode, torch.nn.Module]:
    cached = lm._fake
    if cached is None:
        from transformers import AutoModelForCausalLM

        mode = lm._meta_mode()  # one mode per model: its fakes meet the metadata world's
        with mode:
            model = AutoModelForCausalLM.from_config(lm.config, dtype=lm._dtype).eval()
        cached = (mode, model)
        object.__setattr__(lm, "_fake", cached)
    return cached


def scan(lm: LanguageModel, graph: Graph, ids: torch.Tensor, mask: torch.Tensor,
         rows: list[tuple[int, int]], imports: dict | None = None,
         limits: RunLimits = NO_LIMITS) -> dict[int, Any]:
    """Run `graph`'s first step on fake tensors; return its saved (fake) values."""
    mode, model = _fake_model(lm)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    def forward(interp: Interpreter) -> Any:
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    with _quiet(), mode:
        scan_graph = Graph(graph.model, graph.nodes, graph.invokes, graph.tensors,
                           GENERATE if graph.mode == GENERATE else SCAN, graph.options)
        return execute(scan_graph, model, forward, rows, ids.shape[0], RunConfig(limits), imports=imports,
                       order=lm._order)


class _quiet:
    """Fake tensors log every exception an op raises, which we report ourselves."""

    def __enter__(self) -> None:
        self.log = logging.getLogger("torch._subclasses.fake_tensor")
        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        self.log.setLevel(self.level)


# --- record-time metadata ---------------------------------------------------------------

_CAPTURING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("nnglass_capture", default=None)
SiteValues = dict[tuple[str, str, int], Any]  # (path, kind, call) -> captured value


def capture(mode: FakeTensorMode, model: torch.nn.Module, run: Callable[[], Any],
            ops: bool = False) -> SiteValues:
    """Every module's (args, kwargs) and output in one fake forward `run()`; with `ops`,
    also every `.source` operation's (models/source_notes.py)."""
    sites: SiteValues = {}
    calls: dict[tuple[str, str], int] = {}

    def note(path: str, kind: str, value: Any) -> None:
        n = calls.get((path, kind), 0)
        calls[(path, kind)] = n + 1
        sites[(path, kind, n)] = value

    notes = OpNotes(note) if ops else None

    def pre(path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if _CAPTURING.get() is sites:
                note(path, "inputs", (args, kwargs))
                if notes is not None:
                    notes.enter(path)

        return hook

    def post(path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if _CAPTURING.get() is sites:
                if notes is not None:
                    notes.exit(path)
                note(path, "output", output)

        return hook

    handles = []
    token = _CAPTURING.set(sites)
    try:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post(path)))
        with _quiet(), mode, torch.no_grad(), notes or contextlib.nullcontext():
            run()
    finally:
        for h in handles:
            h.remove()
        _CAPTURING.reset(token)
    return sites


class FakeWorld:
    """Site values of one fake forward, as the graph's invokes see them."""

    def __init__(self, mode: FakeTensorMode, model: torch.nn.Module,
                 sites: Callable[[bool, bool], SiteValues],
                 rows: list[tuple[int, int]], batch: int, result: Any = None, *,
                 convert: Callable[[Any], Any] | None = None,
                 runner: Callable[[], torch.nn.Module] | None = None) -> None:
        """`model`: the module tree (forward signatures); `convert`: a captured value as
        fake tensors of `mode` (a meta capture, models/metaforward.py); `runner`: the
        model whose modules run for `module(...)` calls on fake values (default: `model`)."""
        self._mode = mode
        self.model = model
        self._convert = convert
        self._runner = runner
        # (later, ops) -> captured values (made on first use, cached by the model); `ops`: a
        # capture that also noted the `.source` operations (only made when one is asked)
        self._sites = sites
        self.rows = rows
        self.batch = batch
        self.result = result  # the fake generated ids (generation only)

    def mode(self) -> Any:
        return self._mode

    def site(self, site: Site, invoke: int | None, later: bool) -> Any:
        path, kind, call = site.path, site.kind, site.call
        if kind == "result":
            value = self.result
        else:
            op = split_source(path)
            if op is not None and later:  # the fake step has no KV cache: keys would be 1 wide
                return Unknown("inside attention, a generation step after the first sees the KV cache, "
                               "which the fake forward does not have; use the saved value after the run")
            sites = self._sites(later, op is not None)
            key = (path, "inputs" if kind != "output" else "output", call)
            if key not in sites:
                return Unknown(f"`{path or '<root>'}` call {call} did not run in the fake forward")
            value = sites[key]
            if self._convert is not None:
                value = self._convert(value)
                sites[key] = value  # converted once per capture (fakes are only ever read)
            if kind == "input" and op is not None:
                value = value[0][0] if value[0] else None  # an operation's first argument
            elif kind == "input":
                value = _first_input(self.model.get_submodule(path), *value)
            elif kind == "output" and not path:
                value = without_state(value)
        value = _unknown_state(graph_view(value))
        if invoke is not None and len(self.rows) > 1:
            start, stop = self.rows[invoke]
            with self._mode:
                value = map_batch(value, self.batch, lambda t: t[start:stop])
        return value

    def operations(self, path: str) -> list[str]:
        """The `.source` operations one call of the module at `path` made, in order."""
        return operations(self._sites(False, True), path)

    def _run_model(self) -> torch.nn.Module:
        return self.model if self._runner is None else self._runner()

    def module(self, path: str, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad():
            return _unknown_state(graph_view(self._run_model().get_submodule(path)(*args, **kwargs)))

    def param(self, path: str) -> Any:
        module_path, _, name = path.rpartition(".")
        module = self._run_model().get_submodule(module_path)
        value = module._parameters.get(name)
        return (module._buffers[name] if value is None else value).detach()


_OPERATIONS = ("", "<operations>", -1)  # no capture notes this key: a capture's index of operations


def operations(sites: SiteValues, path: str) -> list[str]:
    """The `.source` operations the first call of the module at `path` made in a capture
    that noted them, in order (indexed once per capture: a trace asks once per site)."""
    index = sites.get(_OPERATIONS)
    if index is None:
        index = {}
        for p, kind, call in list(sites):
            op = split_source(p) if kind == "output" and call == 0 else None
            if op is not None:
                index.setdefault(op.module, []).append(op.name)
        sites[_OPERATIONS] = index
    return list(index.get(path, ()))


def _first_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        names = []
    name = next((p for p in names if p in kwargs), None)
    return None if name is None else kwargs[name]


def _unknown_state(x: Any) -> Any:
    """Model state (a KV cache) has no metadata: `Unknown` in its place."""
    t = type(x)
    if t is Opaque:
        return Unknown(x.why)
    if t is tuple or t is list:
        return t(_unknown_state(y) for y in x)
    if t is dict:
        return {k: _unknown_state(v) for k, v in x.items()}
    return x


class FakeCache:
    """A model's captures by input signature (a few; the oldest goes first)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[Any, SiteValues] = OrderedDict()

    def get(self, key: Any, make: Callable[[], SiteValues]) -> SiteValues:
        found = self._items.get(key)
        if found is None:
            found = make()
            self._items[key] = found
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return found


def signature(x: Any) -> Any:
    """A hashable summary of inputs that decides every shape: tensors by shape, dtype and
    device, everything else by value (its repr, if it is not hashable)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type)
    if type(x) in (tuple, list):
        return (type(x).__name__, *(signature(y) for y in x))
    if isinstance(x, dict):
        return ("dict", *((k, signature(v)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))))
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)
