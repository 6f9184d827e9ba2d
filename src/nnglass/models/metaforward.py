"""A cheap forward for record-time metadata: the model's own code on a meta-device copy.

Under FakeTensorMode every op is dispatched through Python (about 0.3 ms each: a SmolLM2
forward took 1-1.5 s, longer than the real one). Here the model's own forward runs on a
private meta-device copy instead, with two additions:

- **Shadows.** The inputs' real values (token ids, attention mask, positions: known while
  recording) ride along, and every op whose tensor inputs all have one also computes its
  (small) real result. So `.item()` in a model's mask code answers exactly what the real
  run would answer (a meta tensor refuses `.item()`), and the masks a layer receives
  (`None` or a tensor) are the real run's.
- **Repeats.** A call of a module whose structure (class, parameter and buffer shapes and
  dtypes, settings; its index in a stack aside) equals one already run in this forward,
  with inputs of equal shapes, strides and dtypes, and which read no data (`.item()`), is
  not run again: its output and its submodules' captured values are those of the first
  call (the same meta tensors: they hold no data, so sharing them changes nothing).
  Thirty identical decoder layers cost one.

Invariants:
- The copy is private (one per model, built once by `MetaCopy.of`; parameters and buffers
  are meta tensors; the original is never written), so giving its modules a `forward` of
  our own patches nobody else's code.
- Only shapes, strides, dtypes and Python types come out. A forward that needs data it
  cannot know (`.item()` of a value computed from weights, data-dependent shapes, a
  real tensor mixed in) raises; the caller then falls back to FakeTensorMode.
- Captured meta tensors are turned into fake tensors on the real model's device when read
  (`to_fake`), never all at once.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .source_notes import OpNotes

logger = logging.getLogger(__name__)

SiteValues = dict[tuple[str, str, int], Any]  # (path, kind, call) -> captured value
Inputs = Callable[[torch.Tensor], torch.Tensor]  # a real input -> its meta stand-in

# A module's position in a stack never changes the shapes it computes.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_index", "layer_id", "idx", "block_idx"})
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)
_SHADOW_LIMIT = 1 << 18  # elements: masks and positions, never activations
# Ops that answer with Python data: a meta tensor refuses them, its shadow can answer.
_aten = torch.ops.aten
_DATA = frozenset({_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default})


class NotMeta(RuntimeError):
    """The forward needs data a meta run does not have."""


class _Capture:
    """One capture in progress: the sites noted so far and what repeats can reuse."""

    def __init__(self) -> None:
        self.ops: OpNotes | None = None  # `.source` operations, when the capture notes them
        self.sites: SiteValues = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.seen: dict[Any, tuple[Any, list[tuple[str, str, Any]]]] = {}
        self.recorders: list[tuple[str, list[tuple[str, str, Any]]]] = []  # (path, notes) of open calls
        self.reads = 0  # data answered from shadows so far: a call that read some is no repeat

    def note(self, path: str, kind: str, value: Any) -> None:
        n = self.calls.get((path, kind), 0)
        self.calls[(path, kind)] = n + 1
        self.sites[(path, kind, n)] = value
        for prefix, notes in self.recorders:
            if path.startswith(prefix):
                notes.append((path[len(prefix) :], kind, value))


_ACTIVE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("nnglass_meta", default=None)


class MetaCopy:
    """A meta-device copy of a module, with capture hooks and repeat-aware forwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.model = _meta_copy(module)
        self.structures: dict[int, Any] = {}  # id(module) -> its structure, filled when first called
        for path, sub in self.model.named_modules():
            sub.register_forward_pre_hook(_pre(path), with_kwargs=True)
            sub.register_forward_hook(_post(path))
            if path:  # the root runs once anyway
                object.__setattr__(sub, "forward", _repeatable(self, path, sub))

    @staticmethod
    def of(module: torch.nn.Module) -> MetaCopy | None:
        """A copy of `module`, or None where it cannot be copied (logged once by the caller)."""
        try:
            return MetaCopy(module)
        except Exception as e:  # deepcopy of arbitrary user modules can fail in many ways
            logger.debug("no meta copy of %s: %s", type(module).__name__, e)
            return None

    def capture(self, run: Callable[[torch.nn.Module, Inputs], Any], ops: bool = False) -> SiteValues:
        """Every module's (args, kwargs) and output in one meta forward `run(model, meta)`,
        where `meta(real)` gives the meta stand-in of an input whose data is known; with
        `ops`, also every `.source` operation's (models/source_notes.py)."""
        cap = _Capture()
        shadows = _Shadows(cap)
        token = _ACTIVE.set(cap)
        try:
            with shadows, torch.no_grad():
                if ops:
                    cap.ops = OpNotes(cap.note)
                    with cap.ops:
                        run(self.model, shadows.meta)
                else:
                    run(self.model, shadows.meta)
        finally:
            _ACTIVE.reset(token)
        return cap.sites


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are meta tensors (no data is copied) and
    which has none of the original's hooks (a run in progress may have its own there)."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in memo:
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            is_param = isinstance(t, torch.nn.Parameter)
            memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if is_param else meta
    model = copy.deepcopy(module, memo)
    for sub in model.modules():
        for name in _HOOKS:
            getattr(sub, name).clear()
    return model


def _structure(module: torch.nn.Module, memo: dict[int, Any]) -> Any:
    """What decides the shapes a module computes from inputs of given shapes: its class,
    settings, own parameters' and buffers' shapes and dtypes, and its children's (memoized)."""
    key = memo.get(id(module))
    if key is None:
        settings = [(k, v) for k, v in vars(module).items() if k[0] != "_" and k not in _INDEX_ATTRS]
        tensors = (*module._parameters.items(), *module._buffers.items())
        key = memo[id(module)] = (
            type(module),
            tuple(sorted((k, v) for k, v in settings if _simple(v))),
            tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in tensors),
            tuple((k, None if c is None else _structure(c, memo)) for k, c in module._modules.items()),
        )
    return key


def _simple(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return isinstance(v, _SIMPLE)


def _signature(x: Any) -> Any:
    """Inputs by shape, stride and dtype; None where a repeat must not be assumed (an
    object such as a KV cache, which a call may change)."""
    leaves, spec = pytree.tree_flatten(x)
    out: list[Any] = [spec]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device.type))
        elif isinstance(leaf, _SIMPLE):
            out.append(leaf)
        else:
            return None
    return tuple(out)


def _repeatable(owner: MetaCopy, path: str, module: torch.nn.Module) -> Callable[..., Any]:
    prefix, forward = path + ".", module.forward

    @functools.wraps(forward)  # inspect.signature still sees the module's own parameters
    def call(*args: Any, **kwargs: Any) -> Any:
        cap = _ACTIVE.get()
        sig = None if cap is None else _signature((args, kwargs))
        if sig is None:
            return forward(*args, **kwargs)
        key = (_structure(module, owner.structures), sig)
        hit = cap.seen.get(key)
        if hit is not None:
            output, notes = hit
            for rel, kind, value in notes:
                cap.note(prefix + rel, kind, value)
            if cap.ops is not None:
                cap.ops.replay(notes)
            return output  # meta tensors hold no data: sharing them changes nothing
        notes: list[tuple[str, str, Any]] = []
        cap.recorders.append((prefix, notes))
        reads = cap.reads
        try:
            output = forward(*args, **kwargs)
        finally:
            cap.recorders.pop()
        # Shapes that followed the inputs' data (a read `.item()`) are not the shapes' alone.
        if cap.reads == reads and _signature(output) is not None:
            cap.seen[key] = (output, notes)
        return output

    return call


def _pre(path: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cap = _ACTIVE.get()
        if cap is not None:
            cap.note(path, "inputs", (args, kwargs))
            if cap.ops is not None:
                cap.ops.enter(path)

    return hook


def _post(path: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        cap = _ACTIVE.get()
        if cap is not None:
            if cap.ops is not None:
                cap.ops.exit(path)
            cap.note(path, "output", output)

    return hook


class _Shadows(TorchDispatchMode):
    """Meta tensors with their real values where those are known and small."""

    def __init__(self, cap: _Capture) -> None:
        super().__init__()
        self.cap = cap
        self.real: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta, real)

    def meta(self, real: torch.Tensor) -> torch.Tensor:
        """The meta stand-in of an input whose data is known."""
        m = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device="meta")
        self.real[id(m)] = (m, real.cpu())
        return m

    def _shadow(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.device.type != "meta":
            return t
        entry = self.real.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DATA:
            reals = [self._shadow(x) if isinstance(x, torch.Tensor) else x for x in args]
            if any(r is None for r in reals):
                raise NotMeta(f"the forward reads data computed from the weights ({func})")
            self.cap.reads += 1
            return func(*reals, **kwargs)
        out = func(*args, **kwargs)
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        reals = [self._shadow(x) for x in inputs]
        outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.device.type == "meta"]
        if any(r is None for r in reals):
            self._forget_written(func, args, kwargs)
        elif outs and all(o.numel() <= _SHADOW_LIMIT for o in outs):
            self._follow(func, args, kwargs, out)
        return out

    def _follow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Compute the op on the real values too (an op the CPU cannot run leaves none)."""

        def real(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self._shadow(x)
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return x

        try:
            result = func(*pytree.tree_map(real, args), **pytree.tree_map(real, kwargs))
        except Exception:  # then there is just no shadow
            return
        metas, reals = pytree.tree_leaves(out), pytree.tree_leaves(result)
        if len(metas) != len(reals):
            return
        for m, r in zip(metas, reals):
            if isinstance(m, torch.Tensor) and m.device.type == "meta" and isinstance(r, torch.Tensor):
                self.real[id(m)] = (m, r)

    def _forget_written(self, func: Any, args: tuple, kwargs: dict) -> None:
        """An in-place op with an unknown operand leaves its target's shadow stale."""
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                x = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(x, torch.Tensor):
                    self.real.pop(id(x), None)


def to_fake(mode: FakeTensorMode, device: torch.device) -> Callable[[Any], Any]:
    """Captured meta tensors (anywhere in a value) as fake tensors on `device`."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type == "meta":
            return FakeTensor(mode, x, device)
        return x

    def walk(x: Any) -> Any:
        t = type(x)
        if isinstance(x, torch.Tensor):
            return convert(x)
        if t is tuple or t is list:
            return t(walk(y) for y in x)
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return t(*(walk(y) for y in x))
        if isinstance(x, dict):
            items = {k: walk(v) for k, v in x.items()}
            if t is dict:
                return items
            try:  # a ModelOutput keeps its class
                return t(**items)
            except TypeError:
                return items
        return x

    return walk
