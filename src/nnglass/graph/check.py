"""Validation of intervention graphs: the boundary of a server that never runs client code.

Invariant: every graph `check` accepts (and so every graph `wire.decode` returns) names
only IR opcodes and registry ops; reads attributes only from `ops.ATTRIBUTES`; touches
modules and parameters only by literal dotted paths; refers only to earlier nodes (SSA),
to tensors it carries and (in a session's trace) to nodes of earlier traces; holds only
value types the wire can carry; and stays within `Limits`. Nothing here recurses on
client data: JSON nesting is measured on the raw bytes before `json.loads` (which
recurses), every walk over values uses an explicit stack, and counts are checked before
the work they bound.

Order: version, structure (counts and sizes first: they bound the rest), ops, references.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GraphError, VersionError
from .ir import MODES, OPCODES, SESSION, SITE_KINDS, WIRE_VERSION, Graph, Invoke, Node, Ref, Site, TensorRef
from .ops import ATTRIBUTES, REGISTRY, OpRegistry
from .source import split as split_source

# Dtypes a value may name, by their canonical name (never looked up with getattr).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
        torch.complex128, torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
        torch.int64, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
TENSOR_DTYPES = frozenset(DTYPES) - {"complex128"}  # what safetensors carries
_DTYPE_SET = frozenset(DTYPES.values())
_TENSOR_DTYPE_SET = frozenset(DTYPES[n] for n in TENSOR_DTYPES)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

_PART = r"(?:[A-Za-z][A-Za-z0-9_]*|[0-9]+)"  # ASCII only; no part starts with "_"
_PATH = re.compile(rf"{_PART}(?:\.{_PART})*", re.ASCII)
_VERSION = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})", re.ASCII)
_TENSOR_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", re.ASCII)


@dataclass(frozen=True)
class Limits:
    """Resource bounds; a session's traces share its node and tensor budgets. `max_depth`
    bounds value nesting; raw JSON may nest `json_depth` deep (a tagged container costs two
    JSON levels, a session's traces sit two levels down)."""

    max_json_bytes: int = 16 * 2**20
    max_depth: int = 32
    max_nodes: int = 100_000
    max_tensor_bytes: int = 2**30
    max_string_len: int = 4096
    max_invokes: int = 1024
    max_children: int = 256  # traces in one session

    @property
    def json_depth(self) -> int:
        return 2 * self.max_depth + 12


DEFAULT_LIMITS = Limits()


def _show(x: object, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _bound(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise GraphError(f"graph has {n} {what}, over the limit of {limit}")


def _node_error(node: Node, problem: str) -> GraphError:
    where = node.where if isinstance(node.where, str) else ""
    return GraphError(f"node {node.id} ({_show(node.op)}): {problem}", where=where)


# -- raw JSON ------------------------------------------------------------------------

def check_version(version: object) -> None:
    """Same major version as ours, or a VersionError naming both."""
    m = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if m is None:
        raise GraphError(f"graph version must be a string like '1.0', got {_show(version)}")
    ours = WIRE_VERSION.split(".")[0]
    if int(m.group(1)) != int(ours):
        raise VersionError(
            f"graph version {version}, this side speaks {ours}.x: use a client and a server "
            "of the same major version"
        )


# -- JSON document structure -----------------------------------------------------------

_ALLOWED = ("None, bool, int, float, str, list, tuple, dict with str keys, slice, Ellipsis, "
            "torch.dtype, torch.device, torch.Size, node and tensor references")


def _walk(root: Any, limits: Limits, before: int | None, tensors: dict[str, Any]) -> None:
    """Check one value. A Ref must point below `before` (None: no Refs allowed here)."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > limits.max_depth:
            raise GraphError(f"a value nests deeper than {limits.max_depth} levels")
        t = type(x)
        if x is None or x is Ellipsis or t in (bool, float, torch.device):
            continue
        if t is torch.Size:
            if not all(type(n) is int and 0 <= n <= INT_MAX for n in x):
                raise GraphError(f"torch.Size {_show(x)} must hold non-negative ints")
        elif t is int:
            if not INT_MIN <= x <= INT_MAX:
                raise GraphError(f"integer {_show(x)} does not fit in 64 bits")
        elif t is str:
            if len(x) > limits.max_string_len:
                raise GraphError(f"a string is longer than {limits.max_string_len} characters")
        elif t is list or t is tuple:
            stack.extend((c, depth + 1) for c in x)
        elif t is dict:
            for k, v in x.items():
                if type(k) is not str:
                    raise GraphError(f"dict keys must be str, got {type(k).__name__} {_show(k)}")
                stack.extend(((k, depth + 1), (v, depth + 1)))
        elif t is slice:
            stack.extend(((x.start, depth + 1), (x.stop, depth + 1), (x.step, depth + 1)))
        elif t is Ref:
            if before is None:
                raise GraphError("references to nodes are not allowed here")
            if type(x.id) is not int:
                raise GraphError(f"a reference id must be an int, got {_show(x.id)}")
            if x.id == before:
                raise GraphError("refers to itself")
            if not 0 <= x.id < before:
                raise GraphError(f"refers to node {x.id}, which does not come before it; "
                                 "a node may only use earlier nodes")
        elif t is TensorRef:
            if type(x.key) is not str or x.key not in tensors:
                raise GraphError(f"refers to attached tensor {_show(x.key)}, which the graph "
                                 "does not carry")
        elif t is torch.dtype:
            if x not in _DTYPE_SET:
                raise GraphError(f"dtype {x} cannot travel in a graph")
        elif isinstance(x, torch.Tensor):
            raise GraphError("a raw tensor inside a value; attach it with graph.attach(tensor)")
        else:
            raise GraphError(f"values of type {t.__module__}.{t.__qualname__} cannot travel in "
                             f"a graph (allowed: {_ALLOWED})")


def _check_fields(node: Node, i: int, graph: Graph, limits: Limits) -> None:
    if type(node.where) is not str or len(node.where) > limits.max_string_len:
        raise GraphError(f"node {i}: where must be a str of at most {limits.max_string_len} chars")
    if type(node.id) is not int or node.id != i:
        raise _node_error(node, f"node ids must be 0..n-1 in order; node {i} has {_show(node.id)}")
    if type(node.op) is not str or not node.op or len(node.op) > limits.max_string_len:
        raise _node_error(node, "op must be a non-empty str")
    if type(node.args) is not tuple or type(node.kwargs) is not dict:
        raise _node_error(node, "args must be a tuple and kwargs a dict")
    if type(node.save) is not bool or type(node.step) is not int or node.step < -1:
        raise _node_error(node, "save must be a bool and step an int >= -1")
    if node.invoke is not None:
        n = len(graph.invokes)
        if type(node.invoke) is not int or node.invoke < 0:
            raise _node_error(node, f"invoke must be None or an int >= 0, not {_show(node.invoke)}")
        if node.invoke >= n:
            raise _node_error(node, f"invoke {node.invoke} does not exist ({n} invokes)")
    site = node.site
    if site is not None:
        if type(site) is not Site:
            raise _node_error(node, f"site must be a Site, got {_show(site)}")
        if site.kind not in SITE_KINDS:
            raise _node_error(node, f"site kind {_show(site.kind)} is not one of {SITE_KINDS}")
        ints = type(site.call) is int and type(site.step) is int
        if not (ints and site.call >= 0 and site.step >= -1):
            raise _node_error(node, "site call must be an int >= 0 and step an int >= -1")


def _check_op(node: Node, registry: OpRegistry, session: tuple[int, list[Graph]] | None) -> None:
    op, args, site = node.op, node.args, node.site
    if op == "import":  # (index of an earlier trace of the session, a node id in it)
        if session is None:
            raise _node_error(node, "import is only valid in a trace of a session")
        k, traces = session
        ok = len(args) == 2 and not node.kwargs and all(type(a) is int for a in args)
        if not (ok and 0 <= args[0] < k and 0 <= args[1] < len(traces[args[0]].nodes)):
            raise _node_error(node, f"import needs (an earlier trace's index, a node id in it); "
                                    f"got {_show(args)} in trace {k}")
    if op in OPCODES:
        if (op in ("get", "set")) != (site is not None):
            raise _node_error(node, "get and set need a site; no other op may have one")
        if site is not None and not _is_path(site.path, root_ok=True):
            raise _node_error(node, f"bad module path {_show(site.path)}: {_PATH_RULE}")
        if op == "get" and (args or node.kwargs):
            raise _node_error(node, "get takes no arguments")
        skip_only = list(node.kwargs) == ["skip"] and node.kwargs["skip"] is True
        if op == "set" and (len(args) != 1 or not (not node.kwargs or skip_only)):
            raise _node_error(node, "set takes exactly one argument, the new value (and skip=True, "
                                    "only for a module's output)")
        operation = site is not None and split_source(site.path) is not None
        if operation and (node.kwargs or site.kind == "result"):
            raise _node_error(node, "an operation inside a forward (`.source`) has an input, inputs and "
                                    "an output, and cannot be skipped")
        if node.kwargs and site is not None and site.kind != "output":
            raise _node_error(node, "skip=True replaces a module's output; this set is of its "
                                    f"{_show(site.kind)}")
        if op in ("grad", "set_grad", "backward") and (not args or type(args[0]) is not Ref):
            raise _node_error(node, f"{op} needs a reference to an earlier node as first argument")
        if op in ("module", "param") and not _is_path(args[0] if args else None, op == "module"):
            path = _show(args[0] if args else None)
            raise _node_error(node, f"{op} needs a literal path as first argument, got {path}: "
                                    f"{_PATH_RULE}")
        return
    if any(not part or part.startswith("_") for part in op.split(".")):
        raise _node_error(node, "op names are dotted and have no empty or '_'-prefixed parts")
    if op not in registry:
        raise _node_error(node, "unknown op, not in the op registry (register a local "
                                "function with nnglass.register; a server runs only its own)")
    if site is not None:
        raise _node_error(node, "only get and set nodes may have a site")
    if "out" in node.kwargs:  # writing into a caller-chosen tensor would dodge in-place tracking
        raise _node_error(node, "`out=` is not supported in graphs: assign the result instead")
    if op == "builtins.getattr":
        name = args[1] if len(args) == 2 else None
        if node.kwargs or type(name) is not str or name not in ATTRIBUTES:
            readable = ", ".join(sorted(ATTRIBUTES))
            raise _node_error(node, f"reading attribute {_show(name)} is not allowed; readable: "
                                    f"{readable} (parameters are read with 'param')")


_PATH_RULE = "dotted names and integers, no part starting with '_'"


def _is_path(path: object, root_ok: bool) -> bool:
    return type(path) is str and ((root_ok and path == "") or bool(_PATH.fullmatch(path)))


def check(graph: Graph, registry: OpRegistry = REGISTRY, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise GraphError (naming the node and the user's line) unless `graph` is valid.

    Graph-wide: version, counts, fields, attached tensors and their total size; then per
    node: fields, op, values (their types, depth, and references). A session holds no
    nodes of its own: its traces (`children`) are checked in order, sharing the limits.
    """
    check_version(graph.version)
    traces = graph.children
    if type(traces) is not list:
        raise GraphError("graph children must be a list")
    if graph.mode != SESSION:
        if traces:
            raise GraphError("only a session has child traces")
        _bound(_check_tensors(graph.tensors), limits.max_tensor_bytes, "bytes of attached tensors")
        _check_trace(graph, registry, limits, None)
        return
    if graph.nodes or graph.invokes or graph.tensors:
        raise GraphError("a session's own nodes, invokes and tensors must be empty: its "
                         "traces hold them")
    _bound(len(traces), limits.max_children, "traces")
    if any(type(t) is not Graph or t.mode == SESSION or t.children for t in traces):
        raise GraphError("a session's children must be traces (sessions cannot be nested)")
    _bound(sum(len(t.nodes) for t in traces), limits.max_nodes, "nodes")
    total = sum(_check_tensors(t.tensors) for t in traces)
    _bound(total, limits.max_tensor_bytes, "bytes of attached tensors")
    for k, trace in enumerate(traces):
        try:
            check_version(trace.version)
            _check_trace(trace, registry, limits, (k, traces))
        except GraphError as e:
            raise GraphError(f"trace {k}: {e.message}", e.where) from None


def _check_tensors(tensors: object) -> int:
    """The attached tensors' byte count, once each is known to be able to travel."""
    if type(tensors) is not dict:
        raise GraphError("graph tensors must be a dict")
    total = 0
    for key, t in tensors.items():
        if type(key) is not str or not _TENSOR_KEY.fullmatch(key):
            raise GraphError(f"attached tensor key {_show(key)} must be short and alphanumeric")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise GraphError(f"attached tensor {key!r} must be a dense torch.Tensor")
        if t.dtype not in _TENSOR_DTYPE_SET:
            raise GraphError(f"attached tensor {key!r} has dtype {t.dtype}, which cannot travel")
        total += t.numel() * t.element_size()
    return total


def _check_trace(graph: Graph, registry: OpRegistry, limits: Limits,
                 session: tuple[int, list[Graph]] | None) -> None:
    nodes, invokes, tensors = graph.nodes, graph.invokes, graph.tensors
    if type(nodes) is not list or type(invokes) is not list:
        raise GraphError("graph nodes and invokes must be lists")
    _bound(len(nodes), limits.max_nodes, "nodes")
    _bound(len(invokes), limits.max_invokes, "invokes")
    if type(graph.model) is not str or len(graph.model) > limits.max_string_len:
        raise GraphError("graph model must be a str (the served model's name)")
    if graph.mode not in MODES:
        raise GraphError(f"graph mode {_show(graph.mode)} is not one of {MODES}")
    if type(graph.options) is not dict:
        raise GraphError("graph options must be a dict")
    try:
        _walk(graph.options, limits, None, tensors)
    except GraphError as e:
        raise GraphError(f"options: {e.message}") from None
    for i, inv in enumerate(invokes):
        try:
            if not (type(inv) is Invoke and type(inv.args) is tuple and type(inv.kwargs) is dict):
                raise GraphError("must be an Invoke with tuple args and dict kwargs")
            _walk(inv.args, limits, None, tensors)
            _walk(inv.kwargs, limits, None, tensors)
        except GraphError as e:
            raise GraphError(f"invoke {i}: {e.message}") from None
    for i, node in enumerate(nodes):
        if type(node) is not Node:
            raise GraphError(f"graph node {i} is a {type(node).__name__}, not a Node")
        _check_fields(node, i, graph, limits)
        _check_op(node, registry, session)
        try:
            _walk(node.args, limits, node.id, tensors)
            _walk(node.kwargs, limits, node.id, tensors)
        except GraphError as e:
            raise _node_error(node, e.message) from None
