"""How many bytes Python values hold, and what a Python-level op (`operator.*`,
`builtins.*` on plain values) would make, told from its arguments before it runs.

Invariants: sizing never runs the op; integers in graphs stay within `INT_BITS` (an
operand or a result beyond it is refused: a result's bit length is bounded from its
operands' before computing, so `3 ** 10**8` or `1 << 10**9` is never computed); a range
stands for the list it iterates (`list(range(n))`, `max(range(n))` are charged for n
items); repeating a sequence costs its size times the count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ResourceLimitError

INT_BITS = 64  # Python ints in a graph: larger operands or results are refused
TENSOR_OBJECT = 512  # a tensor's Python object and TensorImpl, roughly; counts for views too
POINTER = 8
PY_NUMBER = 32  # an int or float object
PY_OBJECT = 64  # anything else (a range, a slice, None is free)


def refuse(message: str) -> ResourceLimitError:
    return ResourceLimitError(message)  # the interpreter adds the node's line


def value_bytes(x: Any) -> int:
    """Bytes a value holds: tensors by numel x element size, Python objects roughly."""
    total, stack, seen = 0, [x], set()
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif v is None or isinstance(v, (bool, torch.dtype, torch.device)):
            pass
        elif isinstance(v, (int, float, complex)):
            total += PY_NUMBER
        elif isinstance(v, (str, bytes)):
            total += 49 + len(v) * (1 if isinstance(v, bytes) or v.isascii() else 4)
        elif isinstance(v, (list, tuple, dict)):
            if id(v) in seen:  # a list that holds itself (setitem) or a shared sublist
                continue
            seen.add(id(v))
            items = list(v.values()) if isinstance(v, dict) else v
            total += 56 + POINTER * len(items) * (3 if isinstance(v, dict) else 1)
            stack.extend(items)
        else:
            total += PY_OBJECT
    return total


_ITERATING = frozenset("builtins.list builtins.tuple builtins.dict builtins.sum builtins.min builtins.max "
                       "operator.contains operator.eq operator.ne".split())
_COPYING = ("builtins.list", "builtins.tuple", "builtins.dict")
_INT_RESULT_BITS: dict[str, Callable[[int, int], int]] = {
    "add": lambda a, b: max(a.bit_length(), b.bit_length()) + 1,
    "mul": lambda a, b: a.bit_length() + b.bit_length(),
    "lshift": lambda a, b: a.bit_length() + max(b, 0),
    "pow": lambda a, b: 1 if b < 0 or abs(a) < 2 else (abs(a).bit_length() - 1) * b + 1,
}
_INT_RESULT_BITS["sub"] = _INT_RESULT_BITS["add"]


def python_op_size(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes a Python-level op makes, from its arguments alone (tensors in them are sized
    by the meta run instead)."""
    head = name.rpartition(".")[2]
    for a in (*args, *kwargs.values()):
        if type(a) is int and a.bit_length() > INT_BITS:
            raise refuse(f"`{name}` got a {a.bit_length():,}-bit integer; integers in graphs are limited "
                         f"to {INT_BITS} bits")
    if len(args) == 2 and type(args[0]) is int and type(args[1]) is int and head in _INT_RESULT_BITS:
        bits = _INT_RESULT_BITS[head](*args)
        if bits > INT_BITS:
            raise refuse(f"`{name}` would make a {bits:,}-bit integer; integers in graphs are limited "
                         f"to {INT_BITS} bits")
        return PY_NUMBER
    it = args[0] if args else None
    if isinstance(it, range) and name in _ITERATING:  # a range stands for the list it iterates
        return _range_len(it) * (POINTER + PY_NUMBER)
    if head == "mul" and len(args) == 2:
        seq, n = args if isinstance(args[1], int) else args[::-1]
        if isinstance(seq, (str, bytes)) and isinstance(n, int):
            return value_bytes(seq) + (value_bytes(seq) - 49) * max(n - 1, 0)
        if isinstance(seq, (list, tuple)) and isinstance(n, int):
            return value_bytes(seq) * max(n, 1)  # counts shared items each time: an upper bound
    if head == "add" and len(args) == 2 and type(args[0]) is type(args[1]) and \
            isinstance(args[0], (str, bytes, list, tuple)):
        return value_bytes(args[0]) + value_bytes(args[1])
    if head == "mod" and isinstance(it, (str, bytes)):
        return _formatted(name, it, args[1] if len(args) > 1 else ())
    if head == "sum" and isinstance(it, (list, tuple)) and len(args) + len(kwargs) > 1:
        start = args[1] if len(args) > 1 else kwargs.get("start")
        if isinstance(start, (list, tuple, str, bytes)):
            # sum(lists, []) concatenates one at a time, copying the growing result each step.
            return (value_bytes(start) + sum(value_bytes(x) for x in it)) * max(len(it), 1)
    if name in _COPYING and isinstance(it, (str, bytes, list, tuple, dict)):
        per = 3 * POINTER if name == "builtins.dict" else POINTER
        return 56 + len(it) * (per + (56 if isinstance(it, str) else 0))
    return PY_OBJECT


def _range_len(r: range) -> int:  # len() raises past sys.maxsize
    return max(0, (r.stop - r.start + r.step - (1 if r.step > 0 else -1)) // r.step)


_SPEC = re.compile(r"%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")


def _formatted(name: str, fmt: str | bytes, values: Any) -> int:
    """`'%5d' % x`: at most the format, its widths and precisions, and each value's text."""
    pattern = _SPEC.pattern.encode() if isinstance(fmt, bytes) else _SPEC.pattern
    total = len(fmt)
    for width, precision in re.findall(pattern, fmt):
        for n in (width, precision):
            if n in ("*", b"*"):
                raise refuse(f"`{name}`: a `*` width in a format string is not allowed here")
            total += int(n) if n else 0
    return total + 32 * value_bytes(values)


def check_int_result(name: str, out: Any) -> None:
    """A Python int an op returned (int(t), sum of ints, abs) stays within `INT_BITS`."""
    if type(out) is int and out.bit_length() > INT_BITS:
        raise refuse(f"`{name}` made a {out.bit_length():,}-bit integer; integers in graphs are limited "
                     f"to {INT_BITS} bits")
