"""Proxies: stand-ins for values the model has not produced yet.

Invariant: every operation on a `Proxy` inside a trace appends exactly one node to the
tracer's graph and returns a new `Proxy` (in-place operations return the same proxy,
now bound to the new node, so later reads see the edit, as in PyTorch). Nothing runs.
After the trace, a saved proxy becomes a `Saved` (saved.py): it behaves like its value.

What does not depend on the data is answered while recording, from fake tensors
(meta.py): `.shape`, `.dtype`, `.device`, `.ndim`, `.size()`, `len()`, iteration and the
Python type (`isinstance(p, torch.Tensor)` is True for a tensor value: `__class__` is a
property, as `unittest.mock` does it; `type(p)` stays `Proxy`). Asking costs one fake
forward per input signature (cached by the model); not asking costs nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TraceError
from ..graph.ir import GRAD, SET_GRAD, find
from ..graph.ops import ATTRIBUTES, REGISTRY
from . import meta
from .saved import NEVER_RAN as NEVER_RAN
from .saved import NeverRan as NeverRan
from .saved import Saved as Saved
from .saved import _Slots
from .saved import finish as finish
from .where import third_party_caller

if TYPE_CHECKING:
    from .tracer import Tracer

_CONTROL_FLOW = (
    "a proxy has no value while the trace is being recorded, so Python `if`, `while`, "
    "`and`/`or` and `bool()` cannot branch on it; use torch.where(cond, a, b) or compute "
    "the condition after the trace from a saved value"
)


_set_class = object.__dict__["__class__"].__set__
_set_tracer = _Slots._tracer.__set__  # type: ignore[attr-defined]  # slot setters: no __setattr__
_set_id = _Slots._id.__set__  # type: ignore[attr-defined]


class Proxy(_Slots):
    """A value inside a trace: the output of node `_id` of `_tracer`'s graph."""

    __slots__ = ()

    def __init__(self, tracer: Tracer, node_id: int) -> None:
        _set_tracer(self, tracer)
        _set_id(self, node_id)

    # --- nnglass verbs -------------------------------------------------------------
    def save(self) -> Proxy:
        """Return this value after the trace (a snapshot taken where `save` is called)."""
        self._tracer.mark_saved(self)
        return self

    @property
    def grad(self) -> Proxy:
        """The gradient w.r.t. this module input/output; declare it before `.backward()`."""
        return self._tracer.record(GRAD, (self,))

    @grad.setter
    def grad(self, value: Any) -> None:
        self._tracer.record(SET_GRAD, (self, value))

    def backward(self, gradient: Any = None) -> Any:
        """Recorded at once; also a block, nnsight's spelling: `with loss.backward():` reads
        `.grad`s inside, and the backward is recorded where the block ends (tracing/verbs.py)."""
        from .verbs import BackwardBlock

        return BackwardBlock(self._tracer, self._tracer.record_backward(self, gradient))

    @property
    def value(self) -> Any:
        job = getattr(self._tracer, "job", None)
        if job is not None and id(self) in self._tracer.saved:  # saved, but its job is still out
            raise TraceError(f"job {job.id} has not delivered its values yet: call "
                             "`tracer.job.wait()` first", self._tracer.where())
        raise TraceError(
            "`.value` is only available after the trace block has run, and only for values "
            "you called `.save()` on",
            self._tracer.where(),
        )

    # --- metadata (answered while recording; see meta.py) ------------------------------
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return meta.python_type(self)

    @__class__.setter
    def __class__(self, cls: type) -> None:
        _set_class(self, cls)

    @property
    def shape(self) -> Shape:
        return Shape(meta.shape(self, noted=False), self)

    @property
    def dtype(self) -> torch.dtype:
        return meta.dtype(self)

    @property
    def device(self) -> torch.device:
        return meta.device(self)

    @property
    def ndim(self) -> int:
        return len(meta.shape(self, noted=False))  # no prompt's length changes it

    @property
    def is_cuda(self) -> bool:
        return meta.device(self).type == "cuda"

    def size(self, dim: int | None = None) -> Any:
        return Shape(meta.shape(self, noted=False), self) if dim is None else meta.size(self, dim)

    def dim(self) -> int:
        return len(meta.shape(self, noted=False))

    def numel(self) -> int:
        return meta.shape(self).numel()

    def is_floating_point(self) -> bool:
        return meta.dtype(self).is_floating_point

    def __len__(self) -> int:
        return meta.length(self)

    def __iter__(self) -> Any:
        if issubclass(meta.python_type(self), dict):
            return iter(meta.keys(self))
        return (self[i] for i in range(meta.length(self)))

    # --- recording ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # no op or attribute is private; probes (`_is_param`) get a no
            raise AttributeError(name)
        library = third_party_caller()
        if library is not None:
            raise TraceError(
                f"a library function ({os.path.basename(library)}) asked a traced value for "
                f"`.{name}`, but it has no data while recording; use torch operations inside "
                "the trace, or call the library on saved values after it",
                self._tracer.where(),
            )
        if name in ATTRIBUTES:
            return self._tracer.record("builtins.getattr", (self, name))
        if name in ("past_key_values", "cache"):
            raise TraceError("a KV cache is model state, not a value: it cannot be read or saved in a "
                             "graph; read `.logits` or a layer's `.output` instead", self._tracer.where())
        op = "Tensor." + name
        if op in REGISTRY:
            return _Method(self, op)
        raise TraceError(
            f"`.{name}` cannot be recorded: it is neither a listed attribute "
            f"({', '.join(sorted(ATTRIBUTES))}) nor a registered tensor method",
            self._tracer.where(),
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _Slots.__slots__ or name == "grad":
            object.__setattr__(self, name, value)
        else:
            raise TraceError(f"cannot set attribute `.{name}` on a traced value", self._tracer.where())

    def __getitem__(self, key: Any) -> Proxy:
        return self._tracer.record("operator.getitem", (self, key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tracer.record_inplace(self, "operator.setitem", (self, key, value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError("a traced value is not callable", self._tracer.where())

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        tracer = _find_tracer(args, kwargs)
        name = REGISTRY.name_of(func)
        if name is None:
            fname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise TraceError(
                f"torch function `{fname}` is not in the op registry; use an allowed op or "
                "nnglass.register() it (servers accept only their own registry)",
                tracer.where(),
            )
        return tracer.record(name, tuple(args), dict(kwargs or {}))

    # --- things a recorded value cannot do -------------------------------------------
    def __bool__(self) -> bool:
        raise TraceError(_CONTROL_FLOW, self._tracer.where())

    def __index__(self) -> int:
        raise TraceError("a traced value cannot be used as a Python int while recording",
                         self._tracer.where())

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError(
            "numpy (or another library) asked for a real array, but a traced value has none "
            "until the model runs; use torch ops inside the trace, or numpy on saved values "
            "after it",
            self._tracer.where(),
        )

    def __float__(self) -> float:
        raise TraceError("float() of a traced value is unknown while recording", self._tracer.where())

    def __int__(self) -> int:
        raise TraceError("int() of a traced value is unknown while recording", self._tracer.where())

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        node = self._tracer.graph.nodes[self._id]
        return f"<Proxy %{self._id} {node.op} at {node.where}>"


class _Method:
    """A bound tensor method on a proxy, recorded when called."""

    __slots__ = ("op", "proxy")

    def __init__(self, proxy: Proxy, op: str) -> None:
        self.proxy = proxy
        self.op = op

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer = self.proxy._tracer
        if self.op.endswith("_"):
            return tracer.record_inplace(self.proxy, self.op, (self.proxy, *args), kwargs)
        return tracer.record(self.op, (self.proxy, *args), kwargs)


def _binary(op: str, reflected: bool = False) -> Any:
    if reflected:
        def method(self: Proxy, other: Any) -> Proxy:
            return self._tracer.record(op, (other, self))
    else:
        def method(self: Proxy, other: Any) -> Proxy:
            return self._tracer.record(op, (self, other))
    return method


def _inplace(op: str) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._tracer.record_inplace(self, op, (self, other))
    return method


def _unary(op: str) -> Any:
    def method(self: Proxy) -> Proxy:
        return self._tracer.record(op, (self,))
    return method


for _name, _op in [
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "truediv"),
    ("floordiv", "floordiv"), ("mod", "mod"), ("pow", "pow"), ("matmul", "matmul"),
    ("and", "and_"), ("or", "or_"), ("xor", "xor"), ("lshift", "lshift"), ("rshift", "rshift"),
]:
    setattr(Proxy, f"__{_name}__", _binary(f"operator.{_op}"))
    setattr(Proxy, f"__r{_name}__", _binary(f"operator.{_op}", reflected=True))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Proxy, f"__{_name}__", _binary(f"operator.{_name}"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(f"operator.{_name}"))
# `h += x` edits h in place, as it does on a tensor (and so edits the site h came from).
for _name, _op in [("iadd", "add_"), ("isub", "sub_"), ("imul", "mul_"), ("itruediv", "div_")]:
    setattr(Proxy, f"__{_name}__", _inplace(f"Tensor.{_op}"))


def has_proxy(x: Any) -> bool:
    return find(x, Proxy) is not None


def _find_tracer(args: Any, kwargs: Any) -> Tracer:
    stack = [args, kwargs]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is Proxy:
            return x._tracer
        if t is tuple or t is list:
            stack.extend(x)
        elif t is dict:
            stack.extend(x.values())
    raise TraceError("internal: no proxy among the arguments")


class Shape(tuple):
    """A proxy's shape while recording: a tuple of ints (compares equal to the
    torch.Size), which can also be saved (`h.shape.save()`, for `lm.scan`). It notes which
    sizes the user's code reads (`Meta.recheck`: `h.shape[0]` takes the batch only)."""

    def __new__(cls, size: torch.Size, proxy: Proxy) -> Shape:
        new = super().__new__(cls, size)
        new._proxy = proxy
        new._invokes = proxy._tracer.metadata()._world_invokes
        return new

    def _read(self, dims: Any) -> None:
        for d in dims:
            get = lambda t, d=d: int(t.shape[d])
            meta.note(self._proxy, f"size of dim {d}", get, tuple.__getitem__(self, d), self._invokes)

    def _read_all(self) -> None:
        self._read(range(tuple.__len__(self)))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            self._read(range(tuple.__len__(self))[key])
        else:
            self._read((key,))
        return tuple.__getitem__(self, key)

    def __iter__(self) -> Any:
        self._read_all()
        return tuple.__iter__(self)

    def __eq__(self, other: object) -> bool:
        self._read_all()
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._read_all()
        return tuple.__ne__(self, other)

    def __hash__(self) -> int:
        self._read_all()
        return tuple.__hash__(self)

    def save(self) -> Proxy:
        """The shape as a saved value (`.value` is a torch.Size after the trace)."""
        proxy = self._proxy
        return proxy._tracer.record("builtins.getattr", (proxy, "shape")).save()

    @property
    def value(self) -> torch.Size:
        self._read_all()
        return torch.Size(tuple.__iter__(self))

    def numel(self) -> int:
        return self.value.numel()

    def __repr__(self) -> str:
        return f"torch.Size({list(self)})"
