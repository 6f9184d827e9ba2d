"""Saved values: what a saved proxy becomes once its trace has run.

Invariant: a `Saved` has the same slot layout as a `Proxy` (both are `_Slots`), so
`finish` turns a saved proxy into a `Saved` in place: every reference the user holds
now behaves like the value itself.
"""

from __future__ import annotations

from typing import Any

from ..errors import OutOfOrderError


class _Slots:
    # Proxy and Saved share this layout so a saved proxy can become a Saved in place.
    __slots__ = ("__weakref__", "_id", "_tracer", "_value")


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

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The value's class, so `isinstance(out, tuple)` and `isinstance(h, torch.Tensor)`
        answer for the value (as they did while recording); `type(h)` is still `Saved`."""
        value = self._value
        return Saved if type(value) is NeverRan else type(value)

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


_set_class = object.__dict__["__class__"].__set__  # Proxy's own `__class__` is a property


def finish(proxy: Any, value: Any) -> None:
    """Turn a saved proxy into a `Saved` holding `value` (slots match, so this is cheap)."""
    _set_class(proxy, Saved)
    _Slots._value.__set__(proxy, value)  # type: ignore[attr-defined]

