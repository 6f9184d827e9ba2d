"""Operations inside a module's forward (`.source`): how the graph names them.

A module's forward calls functions that are no modules: the attention probabilities are
the output of a softmax inside a decoder layer's self-attention, never a module's output.
`module.source.<op>_<n>` addresses the n-th call (0-based, in execution order) of one of
the operations below made while one call of that module runs: by the forward itself, by
the functions it calls (transformers' attention interface, e.g. `eager_attention_forward`)
and by its submodules. In the graph such a site is an ordinary `Site` whose path is the
module's path, then `source`, then the operation's name:
`model.layers.0.self_attn.source.softmax_0`, kind `input`, `inputs` or `output`.

Invariants:
- The operations are a reviewed, closed table (`SOURCE_OPS`), each a handful of torch
  callables that compute the same thing however the forward spells the call
  (`F.softmax(x)`, `torch.softmax(x)`, `x.softmax()` are all `softmax`). Nothing else inside
  a forward is addressable, so a graph names only what the table names: no source code is
  read, rewritten or run, on the client or on the server.
- A name is data: `split` parses it with a regular expression and a table lookup; it
  never resolves anything by `getattr`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

SOURCE = "source"  # the path component that leads from a module to its operations
SOURCE_KINDS = ("input", "inputs", "output")

# name -> (the torch callables that are this operation, what it is for)
SOURCE_OPS: dict[str, tuple[tuple[Any, ...], str]] = {
    "softmax": ((F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax),
                "softmax: under eager attention its output is the attention probabilities "
                "[batch, heads, query, key]"),
    "scaled_dot_product_attention": ((F.scaled_dot_product_attention,),
                                     "the fused attention of sdpa: its output is the heads' outputs "
                                     "[batch, heads, query, head_dim]; it never forms the probabilities"),
    "matmul": ((torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__),
               "matrix products: under eager attention matmul_0 gives the scores q k^T "
               "(before scaling and mask), matmul_1 the heads' outputs"),
    "dropout": ((F.dropout, torch.dropout),
                "dropout (the identity in eval mode): under eager attention dropout_0's output is "
                "the probabilities as they meet the values"),
}
BY_FUNCTION: dict[Any, str] = {fn: name for name, (fns, _) in SOURCE_OPS.items() for fn in fns}
_NAME = re.compile(r"([a-z_]+?)_(0|[1-9][0-9]{0,5})", re.ASCII)


class SourceOp(NamedTuple):
    """A parsed `.source` path: the module's path, the operation, which call of it."""

    module: str
    op: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.op}_{self.index}"


def op_of(fn: Any) -> str | None:
    """The table's name for a torch callable (None: not addressable)."""
    try:
        return BY_FUNCTION.get(fn)
    except TypeError:  # unhashable callables are none of ours
        return None


def parse_name(name: str) -> tuple[str, int] | None:
    """("softmax", 0) for "softmax_0"; None unless the name is a table op and an index."""
    m = _NAME.fullmatch(name) if type(name) is str else None
    if m is None or m.group(1) not in SOURCE_OPS:
        return None
    return m.group(1), int(m.group(2))


def split(path: str) -> SourceOp | None:
    """The module and operation of a `.source` path; None for a module's own path. A path
    with a `source` component that does not end in a table op is None too (then it must
    name a module: a submodule may be called `source`)."""
    head, sep, name = path.rpartition(f".{SOURCE}.") if path.count(".") else ("", "", "")
    if not sep:
        if path.startswith(f"{SOURCE}."):  # an operation of the root module
            head, name = "", path[len(SOURCE) + 1:]
        else:
            return None
    parsed = parse_name(name)
    return None if parsed is None else SourceOp(head, *parsed)


def source_path(module: str, name: str) -> str:
    return f"{module}.{SOURCE}.{name}" if module else f"{SOURCE}.{name}"


def known_ops() -> str:
    """The table, one line per operation (for listings and errors)."""
    return "\n".join(f"  {name}_<n>: {why}" for name, (_, why) in SOURCE_OPS.items())
