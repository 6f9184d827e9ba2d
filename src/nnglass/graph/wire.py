"""The wire codec: a Graph as JSON bytes plus its attached tensors as safetensors bytes.

Invariant: `decode(*encode(g))` equals `g` bit for bit for every graph `check` accepts
(tensors, -0.0, NaN, tuple vs list, bool vs int, dtypes), and `decode` returns only
graphs that passed `check`. Decoding never runs, imports or unpickles anything, never
recurses on client data, and looks names up only in explicit tables. Tensors travel
only as safetensors, never as JSON lists; a session's traces travel as "children", each
with its own tensor keys ("k/key" in the one safetensors part). Layout: schema.json.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import GraphError
from .check import DEFAULT_LIMITS, DTYPES, INT_MAX, TENSOR_DTYPES, Limits, check, check_version
from .document import check_document, load_json
from .ir import TRACE, Graph, Invoke, Node, Ref, Site, TensorRef
from .ops import REGISTRY, OpRegistry

SCHEMA_PATH = Path(__file__).with_name("schema.json")

_DTYPE_NAMES = {d: n for n, d in DTYPES.items()}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# A device index as torch parses it back unchanged: no leading zero (torch refuses "cpu:00"),
# at most 127 (torch keeps the index in 8 bits: "cuda:9999" would name cuda:15).
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:([0-9]|[1-9][0-9]|1[01][0-9]|12[0-7]))?", re.ASCII)
_TAGS: dict[str, frozenset[str]] = {
    tag: frozenset({"$", *fields.split()})
    for tag, fields in [
        ("float", "v"), ("tuple", "items"), ("dict", "items"), ("ref", "id"),
        ("tensor", "key"), ("slice", "start stop step"), ("ellipsis", ""), ("dtype", "name"),
        ("device", "name"), ("size", "dims"), ("record", "class items"),
    ]
}
_PAYLOAD = {"float": "v", "ref": "id", "tensor": "key", "dtype": "name", "device": "name",
            "size": "dims"}
_FINISH = object()  # stack marker: build an immutable value once its parts are decoded


def _short(x: object) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def encode_value(
    value: Any,
    *,
    attach: Callable[[torch.Tensor], TensorRef] | None = None,
    max_depth: int = DEFAULT_LIMITS.max_depth,
) -> Any:
    """A value as JSON-able data. Raw tensors go through `attach` (else: an error)."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 0)]
    while stack:
        x, into, key, depth = stack.pop()
        if depth > max_depth:
            raise GraphError(f"value nests deeper than {max_depth} levels (is it cyclic?)")
        t, d = type(x), depth + 1
        out: Any
        if x is None or t in (bool, int, str):
            out = x
        elif t is float:
            out = x if math.isfinite(x) else {"$": "float", "v": repr(x)}
        elif t is list:
            out = [None] * len(x)
            stack.extend((c, out, i, d) for i, c in enumerate(x))
        elif t is tuple:
            items: Any = [None] * len(x)
            out = {"$": "tuple", "items": items}
            stack.extend((c, items, i, d) for i, c in enumerate(x))
        elif t is dict:
            for k in x:
                if type(k) is not str:
                    raise GraphError(f"dict keys must be str to travel, got {type(k).__name__} "
                                     f"key {_short(k)}")
            items = dict.fromkeys(x)
            out = {"$": "dict", "items": items}
            stack.extend((c, items, k, d) for k, c in x.items())
        elif t is Ref:
            out = {"$": "ref", "id": x.id}
        elif t is TensorRef:
            out = {"$": "tensor", "key": x.key}
        elif t is slice:
            out = {"$": "slice", "start": None, "stop": None, "step": None}
            stack.extend(((x.start, out, "start", d), (x.stop, out, "stop", d),
                          (x.step, out, "step", d)))
        elif x is Ellipsis:
            out = {"$": "ellipsis"}
        elif t is torch.Size:
            out = {"$": "size", "dims": list(x)}
        elif t is torch.dtype:
            if x not in _DTYPE_NAMES:
                raise GraphError(f"dtype {x} cannot travel in a graph")
            out = {"$": "dtype", "name": _DTYPE_NAMES[x]}
        elif t is torch.device:
            out = {"$": "device", "name": str(x)}
        elif isinstance(x, dict) and callable(getattr(x, "to_tuple", None)):
            # A transformers ModelOutput: keeps its class across the wire (results only).
            items = dict.fromkeys(k for k, v in x.items() if v is not None)
            out = {"$": "record", "class": f"{t.__module__}.{t.__qualname__}", "items": items}
            stack.extend((x[k], items, k, d) for k in items)
        elif isinstance(x, torch.Tensor):
            if attach is None:
                raise GraphError("a raw tensor inside a value cannot travel as JSON; attach it "
                                 "with graph.attach(tensor) and use the TensorRef")
            ref = attach(x)
            out = {"$": "tensor", "key": ref.key}
        else:
            raise GraphError(f"cannot encode a value of type {t.__module__}.{t.__qualname__}")
        into[key] = out
    return root[0]


def decode_value(
    obj: Any,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    max_depth: int = DEFAULT_LIMITS.max_depth,
    records: Callable[[str, dict[str, Any]], Any] | None = None,
) -> Any:
    """Inverse of `encode_value`. TensorRefs resolve through `tensors` when given.

    Tagged records (model outputs, in results only) are rebuilt by `records(class, items)`;
    without it they are refused.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, Any]] = [(obj, root, 0, 0)]
    while stack:
        x, into, key, depth = stack.pop()
        if x is _FINISH:  # depth holds (constructor, parts)
            make, parts = depth
            into[key] = make(*parts)
            continue
        if depth > max_depth:
            raise GraphError(f"a value nests deeper than {max_depth} levels")
        t, d = type(x), depth + 1
        out: Any = x
        if x is None or t in (bool, int, float, str):
            pass
        elif t is list:
            out = [None] * len(x)
            stack.extend((c, out, i, d) for i, c in enumerate(x))
        elif t is not dict:
            raise GraphError(f"cannot decode a value of JSON type {t.__name__}")
        elif type(x.get("$")) is not str or x["$"] not in _TAGS:
            raise GraphError("a JSON object inside a value must be tagged with '$' as one of "
                             f"{', '.join(_TAGS)}; got {_short(x.get('$'))}")
        elif x.keys() != _TAGS[x["$"]]:
            raise GraphError(f"a tagged {x['$']} has exactly the fields {sorted(_TAGS[x['$']])}")
        else:
            out = _decode_tagged(x, into, key, d, stack, tensors, records)
            if out is _FINISH:
                continue
        into[key] = out
    return root[0]


def _decode_tagged(x: dict[str, Any], into: Any, key: Any, d: int, stack: list,
                   tensors: Mapping[str, torch.Tensor] | None, records: Any = None) -> Any:
    tag = x["$"]
    if tag == "record":
        if records is None or type(x["class"]) is not str or type(x["items"]) is not dict:
            raise GraphError("a tagged record (a model output) is only valid in results")
        fields = dict.fromkeys(x["items"])
        stack.append((_FINISH, into, key, (lambda f, c=x["class"]: records(c, f), [fields])))
        stack.extend((c, fields, k, d) for k, c in x["items"].items())
        return _FINISH
    if tag == "tuple" or tag == "slice":
        parts = x["items"] if tag == "tuple" else [x["start"], x["stop"], x["step"]]
        if type(parts) is not list:
            raise GraphError("a tagged tuple's items must be an array")
        buf: list[Any] = [None] * len(parts)
        make = (lambda *a: a) if tag == "tuple" else slice
        stack.append((_FINISH, into, key, (make, buf)))  # runs after the parts below
        stack.extend((c, buf, i, d) for i, c in enumerate(parts))
        return _FINISH
    if tag == "dict":
        if type(x["items"]) is not dict:
            raise GraphError("a tagged dict's items must be an object")
        out = dict.fromkeys(x["items"])
        stack.extend((c, out, k, d) for k, c in x["items"].items())
        return out
    v = x.get(_PAYLOAD.get(tag, "$"))
    if tag == "float" and type(v) is str and v in _NONFINITE:
        return _NONFINITE[v]
    if tag == "ref" and type(v) is int and v >= 0:
        return Ref(v)
    if tag == "tensor" and type(v) is str:
        if tensors is None:
            return TensorRef(v)
        if v in tensors:
            return tensors[v]
        raise GraphError(f"a value refers to tensor {_short(v)}, which did not come with it")
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype" and type(v) is str and v in DTYPES:
        return DTYPES[v]
    if tag == "device" and type(v) is str and _DEVICE.fullmatch(v):
        return torch.device(v)
    if tag == "size" and type(v) is list and all(type(n) is int and 0 <= n <= INT_MAX for n in v):
        return torch.Size(v)
    raise GraphError(f"bad tagged {tag}: {_PAYLOAD[tag]} {_short(v)} is not valid")


# -- graphs --------------------------------------------------------------------------------


def _node_json(n: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"id": n.id, "op": n.op}
    if n.args:
        out["args"] = encode_value(list(n.args))
    if n.kwargs:
        out["kwargs"] = _encode_kwargs(n.kwargs)
    if n.site is not None:
        s = n.site
        out["site"] = {"path": s.path, "kind": s.kind, "call": s.call, "step": s.step}
    if n.invoke is not None:
        out["invoke"] = n.invoke
    if n.step != 0:
        out["step"] = n.step
    if n.save:
        out["save"] = True
    if n.where:
        out["where"] = n.where
    return out


def _encode_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return encode_value(kwargs)["items"]  # a plain object: its keys must be str


def _prepare(key: str, t: Any, seen: set[int]) -> torch.Tensor:
    """A dense CPU tensor owning its whole storage (safetensors refuses views and sharing)."""
    if not isinstance(t, torch.Tensor) or _DTYPE_NAMES.get(t.dtype) not in TENSOR_DTYPES:
        raise GraphError(f"attached tensor {key!r} cannot travel (a dense tensor of a "
                         "safetensors dtype is needed)")
    try:
        t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError) as e:
        raise GraphError(f"attached tensor {key!r} has no data to send ({e})") from None
    return t


def _trace_json(g: Graph, flat: dict[str, torch.Tensor], prefix: str, seen: set[int]) -> dict:
    manifest = {}
    for key, t in g.tensors.items():
        flat[prefix + key] = t = _prepare(key, t, seen)
        manifest[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    nodes = []
    for n in g.nodes:
        try:
            nodes.append(_node_json(n))
        except GraphError as e:
            raise GraphError(f"node {n.id} ({n.op}): {e.message}", where=n.where) from None
    return {
        "model": g.model,
        "mode": g.mode,
        "options": _encode_kwargs(g.options),
        "invokes": [{"args": encode_value(list(i.args)), "kwargs": _encode_kwargs(i.kwargs)}
                    for i in g.invokes],
        "nodes": nodes,
        "tensors": manifest,
    }


def encode(graph: Graph) -> tuple[bytes, bytes | None]:
    """JSON bytes and safetensors bytes (None when the graph carries no tensors).

    A session's traces go under "children"; trace k's tensor "t0" is "k/t0" in the
    safetensors part (each trace's manifest names its own keys).
    """
    check_version(graph.version)
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    doc = {"version": graph.version, **_trace_json(graph, flat, "", seen)}
    children = []
    for k, child in enumerate(graph.children):
        try:
            children.append(_trace_json(child, flat, f"{k}/", seen))
        except GraphError as e:
            raise GraphError(f"trace {k}: {e.message}", e.where) from None
    if children:
        doc["children"] = children
    text = json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.encode("ascii"), safetensors.torch.save(flat) if flat else None


def _decode_tensors(manifest: dict[str, Any], blob: bytes | None, limits: Limits) -> dict:
    if blob is None:
        if manifest:
            raise GraphError(f"the graph lists {len(manifest)} attached tensor(s) but no "
                             "tensor data came with it")
        return {}
    if len(blob) > limits.max_tensor_bytes:
        raise GraphError(f"tensor data is {len(blob)} bytes, over the limit of "
                         f"{limits.max_tensor_bytes}")
    try:
        loaded = safetensors.torch.load(bytes(blob))
    except Exception as e:  # the parser's own errors vary by version; all mean "bad data"
        raise GraphError(f"tensor data is not valid safetensors: {e}") from None
    if loaded.keys() != manifest.keys():
        missing, extra = sorted(manifest.keys() - loaded), sorted(loaded.keys() - manifest)
        raise GraphError(f"tensor manifest and tensor data differ: missing from the data "
                         f"{_short(missing)}, not in the manifest {_short(extra)}")
    out = {}
    for key, entry in manifest.items():
        t = loaded[key]
        if t.dtype != DTYPES[entry["dtype"]] or list(t.shape) != entry["shape"]:
            raise GraphError(f"attached tensor {key!r}: the manifest says {entry['dtype']} "
                             f"{entry['shape']}, the data holds {_DTYPE_NAMES.get(t.dtype)} "
                             f"{list(t.shape)}")
        out[key] = t
    return out


def _trace(doc: dict[str, Any], tensors: dict[str, Any], version: str, depth: int) -> Graph:
    """A Graph from a JSON part that `check_document` accepted (values decoded here)."""

    def values(obj: Any, what: str, where: str = "") -> Any:
        try:
            return decode_value(obj, max_depth=depth)
        except GraphError as e:
            raise GraphError(f"{what}: {e.message}", where) from None

    def kwargs(obj: Any, what: str, where: str = "") -> Any:
        return values({"$": "dict", "items": obj}, what, where)

    graph = Graph(model=doc["model"], mode=doc.get("mode", TRACE), version=version,
                  tensors=tensors, options=kwargs(doc.get("options", {}), "options"))
    for i, inv in enumerate(doc.get("invokes", [])):
        args = tuple(values(inv.get("args", []), f"invoke {i}"))
        graph.invokes.append(Invoke(args, kwargs(inv.get("kwargs", {}), f"invoke {i}")))
    for n in doc["nodes"]:
        where, what = n.get("where", ""), f"node {n['id']} ({_short(n['op'])})"
        args = tuple(values(n.get("args", []), what, where))
        kw = kwargs(n.get("kwargs", {}), what, where)
        site = Site(**n["site"]) if n.get("site") is not None else None
        graph.nodes.append(Node(n["id"], n["op"], args, kw, site, n.get("invoke"),
                                n.get("step", 0), n.get("save", False), where))
    return graph


def decode(
    json_bytes: bytes,
    tensor_bytes: bytes | None = None,
    *,
    registry: OpRegistry = REGISTRY,
    limits: Limits = DEFAULT_LIMITS,
) -> Graph:
    """Parse and validate a graph; any problem raises GraphError (VersionError first)."""
    doc = load_json(json_bytes, limits)
    if type(doc) is not dict:
        raise GraphError(f"a graph is a JSON object, got {type(doc).__name__}")
    check_version(doc.get("version"))
    check_document(doc, limits)
    parts = [("", doc)] + [(f"{k}/", c) for k, c in enumerate(doc.get("children", []))]
    manifest = {p + key: e for p, part in parts for key, e in part.get("tensors", {}).items()}
    flat = _decode_tensors(manifest, tensor_bytes, limits)
    version, depth = doc["version"], limits.max_depth
    graphs = []
    for k, (prefix, part) in enumerate(parts):
        tensors = {key: flat[prefix + key] for key in part.get("tensors", {})}
        try:
            graphs.append(_trace(part, tensors, version, depth))
        except GraphError as e:
            raise GraphError(f"trace {k - 1}: {e.message}" if k else e.message, e.where) from None
    graph = graphs[0]
    graph.children = graphs[1:]
    check(graph, registry, limits)
    return graph


def roundtrip(graph: Graph) -> Graph:
    """`decode(*encode(graph))`: what the server will see (tests and the debug switch)."""
    return decode(*encode(graph))
