"""How many bytes an op would make, told before it runs; how many bytes a value holds.

Invariant: `op_size` never allocates the op's result and never does the op's work.
- Torch ops (and `operator`/`builtins` ops given tensors) run on the meta device:
  tensors become meta tensors of the same shape and dtype, devices become meta, and the
  op's output shapes come back without data. A cheap bound can skip that run when it
  already proves the op small (`small_bound`).
- Ops whose output shape depends on tensor values (nonzero, unique, boolean masks, ...)
  fail on meta; `DATA_DEPENDENT` bounds each from its inputs. Any other op the meta
  device cannot size is refused, never run to find out.
- Python ops are sized from their arguments (`runtime.python_sizes`): sequence lengths,
  string lengths, and the bit lengths of integers (refused beyond 64 bits).

Bytes are counted by dtype (numel x element size). A result that is a view of an input,
no larger than it, makes no new bytes (a view counts when it grows, as `expand` does:
whatever consumes it may materialize it). Every tensor object costs `TENSOR_OBJECT`,
so an op that splits a tensor into millions of views is counted, and refused before the
meta run would create them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ResourceLimitError
from .python_sizes import (
    POINTER,
    PY_NUMBER,
    TENSOR_OBJECT,
    python_op_size,
    refuse,
    value_bytes,
)

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|meta)(:\d+)?")
TORCH_NAMESPACES = ("torch.", "Tensor.")  # ops that always run on meta to be sized
PYTHON_NAMESPACES = ("operator.", "builtins.")  # Python code, even when given tensors


# --- tensors --------------------------------------------------------------------------------


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # a tensor without a plain storage (some subclasses): never an alias
        return None


def _tensors(x: Any, out: list[torch.Tensor], depth: int = 0) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif depth < 4 and isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out, depth + 1)
    elif depth < 4 and isinstance(x, dict):
        for y in x.values():
            _tensors(y, out, depth + 1)
    return out


def made_bytes(out: Any, inputs: Any) -> int:
    """Bytes `out` adds to what `inputs` already hold (views of an input are free unless
    they are larger than it); tensors cost their object too."""
    leaves = _tensors(out, [])
    if not leaves:
        return value_bytes(out)
    held: dict[int, int] = {}
    for t in _tensors(inputs, []):
        key = _storage(t)
        if key is not None:
            held[key] = max(held.get(key, 0), t.numel())
    total = 0
    for t in leaves:
        key = _storage(t)
        if key is None or key not in held or t.numel() > held[key]:
            total += t.numel() * t.element_size()
        total += TENSOR_OBJECT
    if not isinstance(out, torch.Tensor):  # the containers around the tensors
        total += value_bytes(out) - sum(t.numel() * t.element_size() for t in leaves)
    return total


# --- ops -------------------------------------------------------------------------------------


def op_size(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, limit: int) -> int | None:
    """The bytes `fn(*args, **kwargs)` would make; raises `ResourceLimitError` over `limit`
    or when it cannot tell. None: the op fails on its arguments (run it for its error)."""
    torch_op = name.startswith(TORCH_NAMESPACES)
    # operator/builtins ops are Python code even when given tensors (`[t] * n`): size
    # their Python side first, so the meta run never builds a huge list.
    size = None if torch_op else _within(name, python_op_size(name, args, kwargs), limit)
    if torch_op or _tensors((args, kwargs), []):
        meta = _within(name, tensor_op_size(name, fn, args, kwargs, limit, values_ok=torch_op), limit)
        size = meta if size is None else size if meta is None else max(size, meta)
    return size


def _within(name: str, size: int | None, limit: int) -> int | None:
    if size is not None and size > limit:
        raise refuse(f"`{name}` would make {size:,} bytes, over this server's limit of {limit:,} bytes "
                     "for one op: work on a slice, or in smaller pieces")
    return size


def small_bound(args: Any, kwargs: Any, strings_ok: bool = True) -> int | None:
    """An upper bound on the bytes any registry op makes from these arguments, or None.

    No torch op's output has more elements than p**2, where p multiplies max(n, 2) over
    every tensor's numel and every integer argument (outer, kron and einsum multiply
    numels; sizes, pads, repeats and class counts are integers; eye and diag square one;
    16 bytes covers every dtype), and a float counts as max(|v|, 1/|v|) (arange divides
    by its step). One-element tensors give no bound (a size may be a 0-dim tensor), nor
    does anything unknown; `DATA_DEPENDENT` ops are never bounded here.
    `strings_ok=False` for Python ops: a format string can ask for any width.
    """
    p, stack = 1, [args, kwargs]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            n = v.numel()
            if n == 1:
                return None
            p *= max(n, 2)
        elif isinstance(v, int):  # bool too
            p *= max(abs(v), 2)
        elif isinstance(v, float):  # a tiny float can be a divisor: arange(0, 1, 1e-9)
            if not math.isfinite(v):
                return None
            p *= math.ceil(max(abs(v), 1 / abs(v) if v else 2, 2))
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, slice):
            stack.extend((v.start, v.stop, v.step))
        elif isinstance(v, str) and not strings_ok:
            return None
        elif not (v is None or v is Ellipsis or isinstance(v, (str, torch.dtype, torch.device))):
            return None
        if p > 1 << 24:
            return None
    return 64 * p * p + TENSOR_OBJECT * p


def tensor_op_size(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, limit: int,
                   values_ok: bool = True) -> int | None:
    """The bytes a torch op makes, from a run on the meta device (see the module docstring).

    `values_ok`: a size given as a one-element tensor (`zeros(t)`, `expand(n, t)`) may be
    read and the meta run repeated with its value; only for torch ops, never for Python
    code (`'%9999d' % t` would then run for real)."""
    key = _signature((name, id(fn), args, kwargs))
    size = _SIZES.get(key) if key is not None else None
    if size is not None:
        return size
    margs, mkwargs = _to_meta(args), {k: "meta" if k == "device" else _to_meta(v) for k, v in kwargs.items()}
    fanout = _FanOut(name, limit) if _longest_dim((args, kwargs)) * TENSOR_OBJECT > limit else None
    try:
        size = made_bytes(_on_meta(fn, margs, mkwargs, fanout), (margs, mkwargs))
    except ResourceLimitError:
        raise
    except Exception as e:
        error = e
    else:
        if key is not None:
            if len(_SIZES) >= _SIZES_KEPT:
                _SIZES.clear()
            _SIZES[key] = size
        return size
    bound = DATA_DEPENDENT.get(name)
    if bound is not None:
        return bound(args, kwargs)
    if values_ok and "item() cannot be called on meta" in str(error):
        margs = _to_meta(args, scalars=True)
        mkwargs = {k: "meta" if k == "device" else _to_meta(v, scalars=True) for k, v in kwargs.items()}
        try:
            return made_bytes(_on_meta(fn, margs, mkwargs, fanout), (margs, mkwargs))
        except ResourceLimitError:
            raise
        except Exception:
            pass
    if isinstance(error, NotImplementedError) or "meta" in str(error).lower():
        raise refuse(f"`{name}` cannot be sized before it runs on these arguments ({type(error).__name__}: "
                     f"{str(error)[:200]}), so this server does not run it") from None
    return None  # a plain argument error: the real op raises it, with its own message


# A meta run that succeeded depends only on shapes, strides, dtypes and the Python
# arguments (data-dependent ops fail on meta and are never kept): the same op on the same
# shapes (every layer, every generation step) is sized once per process.
_SIZES: dict[Any, int] = {}
_SIZES_KEPT = 4096
_KEYABLE = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, type(Ellipsis))


def _signature(x: Any) -> Any:
    """A hashable key for the metadata of `x`, or None when it holds anything else."""
    t = type(x)
    if isinstance(x, torch.Tensor):
        return (t, tuple(x.shape), x.stride(), x.dtype, x.device.type)
    if t is tuple or t is list or t is torch.Size:
        out = []
        for y in x:
            k = _signature(y)
            if k is None:
                return None
            out.append(k)
        return (t, tuple(out))
    if t is dict:
        items = _signature(tuple(x.items()))
        return None if items is None else (dict, items)
    if t is slice:
        inner = _signature((x.start, x.stop, x.step))
        return None if inner is None else (slice, inner)
    if isinstance(x, _KEYABLE):
        return (t, x)
    return None


def _on_meta(fn: Callable[..., Any], args: tuple, kwargs: dict, fanout: _FanOut | None) -> Any:
    with torch.device("meta"):
        if fanout is None:
            return fn(*args, **kwargs)
        with fanout:
            return fn(*args, **kwargs)


def _to_meta(x: Any, scalars: bool = False) -> Any:
    t = type(x)
    if isinstance(x, torch.Tensor):
        if scalars and x.numel() == 1 and not x.is_floating_point() and not x.is_complex():
            return int(x.item())
        # Same strides: a reshape that must copy (an expanded view) copies on meta too.
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if t is tuple or t is list:
        return t(_to_meta(y, scalars) for y in x)
    if isinstance(x, dict):
        return {k: _to_meta(v, scalars) for k, v in x.items()}
    if t is torch.device or (t is str and _DEVICE.fullmatch(x)):
        return torch.device("meta")  # a meta run moves nothing
    return x


def _longest_dim(x: Any) -> int:
    return max((max(t.shape, default=0) for t in _tensors(x, [])), default=0)


class _FanOut(TorchDispatchMode):
    """Refuses, before it runs, an op that would split a tensor into more views than the
    limit pays for (unbind, split; also what `list(t)` and `sum(t)` do underneath)."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__()
        self.name, self.most = name, limit // TENSOR_OBJECT

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        returns = func._schema.returns
        if len(returns) == 1 and str(returns[0].type) == "List[Tensor]" and args:
            n = _views(func, args, kwargs)
            if n > self.most:
                raise refuse(f"`{self.name}` would make {n:,} tensors (about {n * TENSOR_OBJECT:,} bytes), "
                             f"over this server's limit of {self.most * TENSOR_OBJECT:,} bytes for one op")
        return func(*args, **kwargs)


def _views(func: Any, args: tuple, kwargs: dict) -> int:
    self, name = args[0], func._overloadpacket.__name__
    shape = self.shape if isinstance(self, torch.Tensor) else ()
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if name == "unbind" and shape:
        return shape[args[1] if len(args) > 1 else kwargs.get("dim", 0)]
    if name == "split" and shape and isinstance(args[1], int) and args[1] > 0:
        return math.ceil(shape[dim] / args[1])
    if len(args) > 1 and isinstance(args[1], (list, tuple)):
        return len(args[1])
    return max(shape, default=1)  # no list-returning op makes more views than its longest dim


# --- data-dependent shapes (the meta device cannot tell; these bounds can) -----------------


def _bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else value_bytes(t)


def _first(args: tuple) -> torch.Tensor:
    return args[0]


def _indices(args: tuple, kwargs: dict) -> int:  # nonzero, argwhere, where(cond): int64 per dim
    t = _first(args)
    dims = max(t.dim(), 1)  # where(cond) gives a tuple of one index tensor per dim
    return t.numel() * dims * 8 + TENSOR_OBJECT * dims + 56 + POINTER * dims


def _selected(args: tuple, kwargs: dict) -> int:  # a mask selects at most every element
    t = _first(args)
    index = args[1] if len(args) > 1 else kwargs.get("mask")
    extra = 1
    for i in _tensors(index, []):
        if i.dtype != torch.bool:
            extra *= max(i.numel(), 1)  # integer index tensors gather as many rows as they hold
    return _bytes(t) * extra + TENSOR_OBJECT


def _unique(args: tuple, kwargs: dict) -> int:  # values, inverse indices, counts
    t = _first(args)
    return _bytes(t) + 2 * 8 * t.numel() + 3 * TENSOR_OBJECT


def _repeat_interleave(args: tuple, kwargs: dict) -> int:  # reads the repeats (one sum)
    t = _first(args)
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if repeats is None:  # torch.repeat_interleave(repeats): the repeats are the input
        return int(t.sum()) * 8 + TENSOR_OBJECT
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    length = t.numel() if dim is None else t.shape[dim]
    if isinstance(repeats, torch.Tensor) and repeats.numel() != 1:
        total = int(repeats.sum())
    else:
        total = int(repeats) * length
    rows = 1 if dim is None else t.numel() // max(length, 1)
    return total * rows * t.element_size() + TENSOR_OBJECT


def _one_hot(args: tuple, kwargs: dict) -> int:
    t = _first(args)
    classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
    if classes is None or int(classes) < 0:
        classes = int(t.max()) + 1 if t.numel() else 0
    return t.numel() * int(classes) * 8 + TENSOR_OBJECT


def _number(args: tuple, kwargs: dict) -> int:
    return PY_NUMBER


def _tolist(args: tuple, kwargs: dict) -> int:  # nested lists: one per row at every level
    t = _first(args)
    total, lists = t.numel() * PY_NUMBER, 1
    for n in t.shape:
        total += lists * 56 + lists * n * POINTER  # the lists of this level and their slots
        lists *= n
    return total


def _copy(args: tuple, kwargs: dict) -> int:  # a copy to another device
    return _bytes(_first(args)) + TENSOR_OBJECT


DATA_DEPENDENT: dict[str, Callable[[tuple, dict], int]] = {
    **dict.fromkeys(["torch.nonzero", "Tensor.nonzero", "torch.argwhere", "Tensor.argwhere", "torch.where"],
                    _indices),
    **dict.fromkeys(["torch.masked_select", "Tensor.masked_select", "operator.getitem"], _selected),
    **dict.fromkeys(["torch.unique", "Tensor.unique"], _unique),
    **dict.fromkeys(["torch.repeat_interleave", "Tensor.repeat_interleave"], _repeat_interleave),
    "torch.nn.functional.one_hot": _one_hot,
    **dict.fromkeys("Tensor.item torch.equal Tensor.equal torch.allclose Tensor.allclose builtins.float "
                    "builtins.int builtins.bool builtins.round operator.contains".split(), _number),
    "Tensor.tolist": _tolist,
    "Tensor.cpu": _copy,
}
