"""Proxies: stand-ins for values the model has not produced yet.

Invariant: every operation on a `Proxy` inside a trace appends exactly one node to the
tracer's graph and returns a new `Proxy` (in-place operations return the same proxy,
now bound to the new node, so later reads see the edit, as in PyTorch). Nothing runs.
After the trace, a saved proxy becomes a `Saved`: it behaves like its value.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import OutOfOrderError, TraceError
from ..graph.ir import GRAD, SET_GRAD
from ..graph.ops import ATTRIBUTES, REGISTRY
from .where import third_party_caller

if TYPE_CHECKING:
    from .tracer import Tracer

_CONTROL_FLOW = (
    "a proxy has no value while the trace is being recorded, so Python `if`, `while`, "
    "`and`/`or` and `bool()` cannot branch on it; use torch.where(cond, a, b) or compute "
    "the condition after the trace from a saved value"
)


class _Slots:
    # Proxy and Saved share this layout so a saved proxy can become a Saved in place.
    __slots__ = ("__weakref__", "_id", "_tracer", "_value")


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

    def backward(self, gradient: Any = None) -> None:
        self._tracer.record_backward(self, gradient)

    @property
    def value(self) -> Any:
        if getattr(self._tracer, "job", None) is not None:
            raise TraceError(f"job {self._tracer.job.id} has not delivered its values yet: call "
                             "`tracer.job.wait()` first", self._tracer.where())  # fmt: skip
        raise TraceError(
            "`.value` is only available after the trace block has run, and only for values "
            "you called `.save()` on",
            self._tracer.where(),
        )

    # --- recording ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
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

    def __iter__(self) -> Any:
        raise TraceError(
            "cannot iterate over a traced value: its length is unknown until the model runs; "
            "index it instead (out[0], out[1]) or use .unbind()/.split() with known sizes",
            self._tracer.where(),
        )

    def __len__(self) -> int:
        raise TraceError("len() of a traced value is unknown while recording; use .shape",
                         self._tracer.where())  # fmt: skip

    def __index__(self) -> int:
        raise TraceError("a traced value cannot be used as a Python int while recording",
                         self._tracer.where())  # fmt: skip

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
]:  # fmt: skip
    setattr(Proxy, f"__{_name}__", _binary(f"operator.{_op}"))
    setattr(Proxy, f"__r{_name}__", _binary(f"operator.{_op}", reflected=True))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Proxy, f"__{_name}__", _binary(f"operator.{_name}"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(f"operator.{_name}"))
# `h += x` edits h in place, as it does on a tensor (and so edits the site h came from).
for _name, _op in [("iadd", "add_"), ("isub", "sub_"), ("imul", "mul_"), ("itruediv", "div_")]:
    setattr(Proxy, f"__{_name}__", _inplace(f"Tensor.{_op}"))


def _find_tracer(args: Any, kwargs: Any) -> Tracer:
    stack = [args, kwargs]
    while stack:
        x = stack.pop()
        if isinstance(x, Proxy):
            return x._tracer
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    raise TraceError("internal: no proxy among the arguments")


class Saved(_Slots):
    """A saved value after its trace ran: behaves like the value itself.

    `h.value` is the value; `h.shape`, `h[0]`, `h + 1`, `torch.allclose(h, ref)` work on it.
    """

    __slots__ = ()

    @property
    def value(self) -> Any:
        if type(self._value) is NeverRan:
            raise OutOfOrderError(
                "this value was never computed: its generation step never ran (generation "
                "ended earlier, e.g. at EOS)", self._tracer.graph.nodes[self._id].where)
        return self._value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __getitem__(self, key: Any) -> Any:
        return self.value[key]

    def __iter__(self) -> Any:
        return iter(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return self.value.__index__()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value.__array__(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._value)

    def _repr_html_(self) -> str | None:
        """Jupyter: shape, dtype, min/mean/max and a histogram (nnglass[viz]; else the repr)."""
        try:
            from ..viz import value_summary
        except ModuleNotFoundError:
            return None
        return value_summary(self).text

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    __hash__ = object.__hash__


def _unwrap(x: Any) -> Any:
    if isinstance(x, Saved):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(y) for y in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _saved_binary(name: str, reflected: bool = False) -> Any:
    def method(self: Saved, other: Any) -> Any:
        other = _unwrap(other)
        return getattr(self.value, name)(other)
    return method


for _name in (
    "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift eq ne lt le gt ge"
).split():
    for _pre in ("", "r"):
        if _pre and _name in ("eq", "ne", "lt", "le", "gt", "ge"):
            continue
        _dunder = f"__{_pre}{_name}__"
        setattr(Saved, _dunder, _saved_binary(_dunder))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Saved, f"__{_name}__", lambda self, _n=_name: getattr(self.value, f"__{_n}__")())


class NeverRan:
    """The value of a node whose generation step never happened."""


NEVER_RAN = NeverRan()


def finish(proxy: Proxy, value: Any) -> None:
    """Turn a saved proxy into a `Saved` holding `value` (slots match, so this is cheap)."""
    object.__setattr__(proxy, "__class__", Saved)
    object.__setattr__(proxy, "_value", value)

