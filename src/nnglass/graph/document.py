"""The raw JSON document of a graph: parsed safely, then checked for shape.

Invariant: `load_json` never lets `json.loads` see bytes over the size limit or nested
deeper than the depth limit (it recurses), refuses duplicate keys, bare NaN/Infinity and
floats that overflow; `check_document` checks every field's type before any value is
decoded, so the decoder only ever walks a document of the expected layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from ..errors import GraphError, MalformedError
from .check import DEFAULT_LIMITS, INT_MAX, TENSOR_DTYPES, Limits, _bound, _show

_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def _nesting(raw: bytes) -> int:
    """The deepest bracket nesting outside strings: linear, at C speed, no recursion.

    Backslash runs pair from the left, so dropping every escaped backslash and then
    every escaped quote leaves only the quotes that open or close strings; every other
    piece of the split is outside a string (an unterminated string runs to the end, as
    in JSON). Invalid JSON may be misjudged only past the point where json.loads stops.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKET)
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} overflows a float; send it tagged")
    return x


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON; non-finite floats travel as {{'$': 'float'}}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # two validators could read different values: refuse
            raise ValueError(f"duplicate key {_show(key)} in a JSON object")
        out[key] = value
    return out


def load_json(raw: bytes | str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse JSON bytes safely: size and nesting are bounded before `json.loads` runs."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise GraphError(f"graph JSON must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    _bound(len(raw), limits.max_json_bytes, "bytes of JSON")
    if _nesting(raw) > limits.json_depth:
        raise GraphError(f"graph JSON nests deeper than {limits.json_depth} levels")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_float=_finite, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise MalformedError(f"graph JSON is not UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        raise MalformedError(f"graph is not valid JSON: {e}") from None


_NONE = type(None)
_TRACE: dict[str, tuple[type, ...]] = {
    "model": (str,), "mode": (str,), "options": (dict,), "invokes": (list,), "nodes": (list,),
    "tensors": (dict,),
}
_TOP = {"version": (str,), **_TRACE, "children": (list,)}
_NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,), "op": (str,), "args": (list,), "kwargs": (dict,), "site": (dict, _NONE),
    "invoke": (int, _NONE), "step": (int,), "save": (bool,), "where": (str,),
}
_SITE_FIELDS = {"path": (str,), "kind": (str,), "call": (int,), "step": (int,)}
_INVOKE_FIELDS = {"args": (list,), "kwargs": (dict,)}
_TENSOR_FIELDS = {"dtype": (str,), "shape": (list,)}

_JSON_NAMES = {str: "a string", int: "an integer", bool: "true/false", list: "an array",
               dict: "an object", _NONE: "null"}


def _fields(obj: object, spec: dict[str, tuple[type, ...]], what: str,
            required: Iterable[str] = (), where: str = "") -> None:
    if type(obj) is not dict:
        raise GraphError(f"{what} must be a JSON object, got {_show(obj)}", where)
    for key, value in obj.items():
        types = spec.get(key)
        if types is None:
            known = ", ".join(spec)
            raise GraphError(f"{what} has unknown field {_show(key)}; known: {known}", where)
        if type(value) not in types:  # exact: true is not an integer, 1.0 is not an int
            want = " or ".join(_JSON_NAMES[t] for t in types)
            raise GraphError(f"{what}: field {key!r} must be {want}, got {_show(value)}", where)
    missing = [k for k in required if k not in obj]
    if missing:
        raise GraphError(f"{what} lacks required field(s) {', '.join(missing)}", where)


def check_document(doc: object, limits: Limits = DEFAULT_LIMITS) -> None:
    """The JSON layout: known fields only, each of its JSON type; counts within limits."""
    _fields(doc, _TOP, "graph", ("version", "model", "nodes"))
    assert isinstance(doc, dict)
    children = doc.get("children", [])
    _bound(len(children), limits.max_children, "traces")
    for k, child in enumerate(children):
        _fields(child, _TRACE, f"trace {k}", ("model", "nodes"))
    _bound(sum(len(g["nodes"]) for g in [doc, *children]), limits.max_nodes, "nodes")
    for k, part in enumerate([doc, *children]):
        try:
            _check_body(part, limits)
        except GraphError as e:
            raise GraphError(f"trace {k - 1}: {e.message}" if k else e.message, e.where) from None


def _check_body(doc: dict[str, Any], limits: Limits) -> None:
    nodes, invokes = doc["nodes"], doc.get("invokes", [])
    _bound(len(invokes), limits.max_invokes, "invokes")
    for i, inv in enumerate(invokes):
        _fields(inv, _INVOKE_FIELDS, f"invoke {i}")
    for i, node in enumerate(nodes):
        where = node.get("where") if type(node) is dict else ""
        where = where[:200] if type(where) is str else ""
        _fields(node, _NODE_FIELDS, f"node {i}", ("id", "op"), where)
        if node.get("site") is not None:
            _fields(node["site"], _SITE_FIELDS, f"node {i} site", _SITE_FIELDS, where)
    for key, entry in doc.get("tensors", {}).items():
        what = f"tensor manifest entry {_show(key)}"
        _fields(entry, _TENSOR_FIELDS, what, _TENSOR_FIELDS)
        if entry["dtype"] not in TENSOR_DTYPES:
            raise GraphError(f"{what}: dtype {_show(entry['dtype'])} cannot travel as a tensor")
        if any(type(d) is not int or not 0 <= d <= INT_MAX for d in entry["shape"]):
            raise GraphError(f"{what}: shape must be a list of non-negative integers")


# -- in-memory graphs --------------------------------------------------------------------

