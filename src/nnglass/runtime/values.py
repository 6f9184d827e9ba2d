"""Values flowing through a run: resolving references, copies, invoke rows.

Invariant: nothing here mutates a tensor it was given; copies are made with `clone`,
and containers (tuples, lists, dicts, transformers ModelOutputs) are rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..graph.ir import Ref, TensorRef, find

UNSET: Any = object()  # a node's value before the node ran


def resolve(x: Any, values: list[Any], tensors: dict[str, Any]) -> Any:
    t = type(x)
    if t is Ref:
        return values[x.id]
    if t is tuple or t is list:
        return t([resolve(y, values, tensors) for y in x])
    if t is dict:
        return {k: resolve(v, values, tensors) for k, v in x.items()}
    if t is slice:
        return slice(resolve(x.start, values, tensors), resolve(x.stop, values, tensors),
                     resolve(x.step, values, tensors))
    if t is TensorRef:
        return tensors[x.key]
    return x


class Opaque:
    """Something a site carries that is not a value (a KV cache, a config, any object but
    tensors, numbers, strings, dtypes, devices and containers of those): a graph may pass
    it along but never open it. It has no items, attributes, length or iteration, so no
    op can take it apart, whatever the key it came under; handed back to the model (a
    setter), it is the object itself again."""

    __slots__ = ("_held", "why")

    def __init__(self, held: Any, why: str = "") -> None:
        self._held = held
        self.why = why or f"a {type(held).__name__}, which is model state, not a value"

    def __repr__(self) -> str:
        return f"<opaque {type(self._held).__name__}>"


SKIPPED = Opaque(None, "the output of a module that `.skip(...)` replaced, so it never ran: "
                 "read `.output` after the skip to see the value that replaced it")

_PLAIN = frozenset({int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.Size})


# --- the one walk over a value's containers --------------------------------------------------
# Containers are lists, tuples (namedtuples keep their class; torch.Size is a leaf), dicts and
# transformers' ModelOutputs (dicts that rebuild with their own class). Anything else is a
# leaf: a tensor, a number, an Opaque, or a model object a graph must never open.


def _is_container(x: Any) -> bool:
    t = type(x)
    return (t is tuple or t is list or t is dict or (isinstance(x, (list, tuple)) and t is not torch.Size)
            or (isinstance(x, dict) and t.__module__.startswith("transformers.")))


def map_values(x: Any, fn: Callable[[Any], Any]) -> Any:
    """`x` with `fn` applied to each leaf (like torch.fx's `map_aggregate`). A container is
    rebuilt only where a leaf changed, else it is returned itself."""
    t = type(x)
    if t is torch.Tensor or not _is_container(x):
        return fn(x)
    if isinstance(x, dict):
        out = {k: map_values(v, fn) for k, v in x.items()}
        if all(out[k] is v for k, v in x.items()):
            return x
        return out if t is dict else _rebuild(x, out)
    items = [map_values(y, fn) for y in x]
    if all(a is b for a, b in zip(items, x)):
        return x
    if t is list or t is tuple:
        return t(items)
    if hasattr(x, "_fields"):
        return t(*items)  # a namedtuple keeps its class
    return list(items) if isinstance(x, list) else tuple(items)


def leaves(x: Any) -> Iterator[Any]:
    """Every leaf of `x`, by the same rule as `map_values`."""
    stack = [x]
    while stack:
        v = stack.pop()
        if type(v) is torch.Tensor or not _is_container(v):
            yield v
        else:
            stack.extend(reversed(list(v.values() if isinstance(v, dict) else v)))


def graph_view(x: Any) -> Any:
    """A site's value as a graph sees it: every leaf that is not a value becomes `Opaque`."""
    return x if type(x) is torch.Tensor else map_values(x, _seen)


def _seen(x: Any) -> Any:
    return x if type(x) in _PLAIN or type(x) is Opaque or isinstance(x, torch.Tensor) else Opaque(x)


def unwrap(x: Any) -> Any:
    """The model's own objects again, where a value holds `Opaque`s (a setter's value)."""
    return x if type(x) is torch.Tensor else map_values(x, _held)


def _held(x: Any) -> Any:
    return x._held if type(x) is Opaque else x


def only_input(args: tuple, kwargs: dict, params: list[str]) -> tuple[tuple, dict]:
    """`.inputs` while weights are hidden: the value `.input` reads (the first positional
    argument, else the first forward parameter passed by keyword); every other argument
    is opaque, so rotary tables, masks and caches derived from buffers stay hidden."""
    if args:
        return (args[0], *(_hide(a) for a in args[1:])), {k: _hide(v) for k, v in kwargs.items()}
    name = next((p for p in params if p in kwargs), None)
    return (), {k: v if k == name else _hide(v) for k, v in kwargs.items()}


def _hide(x: Any) -> Any:
    why = (f"an argument other than `.input` (a {type(x).__name__}), which `.inputs` keeps opaque "
           "while the model's weights are hidden")
    return x if x is None else Opaque(x, why)


def opaque_in(x: Any) -> Opaque | None:
    """The first `Opaque` inside a value, if any (for error messages)."""
    return find(x, Opaque)


def snapshot(x: Any, copy: bool = True) -> Any:
    """A detached copy of a value's tensors, so later edits cannot change it.

    `copy=False` only detaches: for values nothing can edit any more (the root's output
    of a plain trace). KV caches are refused: they are large, mutated by generation after
    the fact, and not values a result can carry.
    """
    if type(x) is torch.Tensor:
        return x.detach().clone() if copy else x.detach()
    return map_values(x, _clone_leaf if copy else _detach_leaf)


def _clone_leaf(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else _plain_leaf(x)


def _detach_leaf(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else _plain_leaf(x)


def _plain_leaf(x: Any) -> Any:
    held = x._held if type(x) is Opaque else x
    if _is_kv_cache(held):
        raise TypeError(
            "a KV cache cannot be saved (it is model state that generation keeps changing); "
            "save `.logits` or a layer's `.output` instead"
        )
    if held is not x:
        raise TypeError(f"this is {x.why}: it cannot be saved (save tensors, numbers, or containers "
                        "of those)")
    return x


def tensor_leaves(x: Any) -> list[torch.Tensor]:
    """The tensors inside a value (tuples, lists, dicts, model outputs)."""
    return [v for v in leaves(x) if isinstance(v, torch.Tensor)]


_STATE_KEYS = ("past_key_values", "cache")


def without_state(x: Any) -> Any:
    """A model output as a graph may see it: without its KV cache (model state, not a value;
    on a server it would expose every layer's keys and values whatever the policy)."""
    if isinstance(x, dict) and type(x) is not dict and any(x.get(k) is not None for k in _STATE_KEYS):
        return _rebuild(x, {k: v for k, v in x.items() if k not in _STATE_KEYS})
    return x


def _is_kv_cache(x: Any) -> bool:
    t = type(x)
    return t.__module__.startswith("transformers.") and any(
        c.__name__ == "Cache" and c.__module__ == "transformers.cache_utils" for c in t.__mro__
    )


def _rebuild(obj: Any, items: dict) -> Any:
    """Same class as `obj` (e.g. a transformers ModelOutput), new contents."""
    try:
        return type(obj)(**items)
    except TypeError:
        return items


def copy_tensors(x: Any) -> Any:
    return map_values(x, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def map_batch(x: Any, batch: int, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` of every tensor whose first axis is the batch; other leaves as they are."""
    return map_values(x, lambda v: fn(v) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch
                      else v)


def zip_batch(full: Any, part: Any, batch: int, put: Any) -> Any:
    if isinstance(full, torch.Tensor):
        if full.dim() and full.shape[0] == batch:
            return put(full, part)
        return part
    if type(full) in (list, tuple) and type(part) in (list, tuple) and len(full) == len(part):
        return type(full)(zip_batch(f, p, batch, put) for f, p in zip(full, part))
    if isinstance(full, dict) and isinstance(part, dict):
        out = {k: zip_batch(full[k], v, batch, put) if k in full else v for k, v in part.items()}
        return out if type(full) is dict else _rebuild(full, out)
    return part


def index_path(value: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        value = value[i]
    return value


def replace_at(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    items = list(value)
    items[path[0]] = replace_at(items[path[0]], path[1:], new)
    return type(value)(items)
