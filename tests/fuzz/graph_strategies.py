"""Hypothesis strategies for hostile graphs: documents generated from the wire's JSON
Schema (src/nnglass/graph/schema.json), and mutations of real recorded graphs.

`from_schema` reads the schema itself (the subset it uses: type, enum, const, pattern,
minimum, properties/required/additionalProperties, items, anyOf/oneOf, $ref), so a field
added to the schema is fuzzed without a change here. Nesting is bounded by a budget that
each $ref spends; past it only scalars are drawn. Generated documents are valid JSON
*shapes*; what they mean (ops, references, sizes) is mostly wrong, which is the point.

`mutated_json` takes one recorded (graph JSON, safetensors bytes) pair and changes one thing:
a value anywhere in the tree (type, size, sign, nesting), an op name, a reference, a
node's id, a field removed or added, the tensor manifest, or the safetensors header.
Each case is its own: a change never reaches an object another case holds (`mutate`
copies what it puts in), so a case depends only on its own draws and replays the same.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from nnglass.graph.ops import REGISTRY
from nnglass.graph.wire import SCHEMA_PATH

SCHEMA = json.loads(SCHEMA_PATH.read_text())
OPS = sorted(REGISTRY.names())
Doc = dict[str, Any]
FORBIDDEN = ["os.system", "builtins.eval", "builtins.__import__", "torch.load", "Tensor.__reduce_ex__",
             "torch.save", "subprocess.run", "builtins.open", "Tensor.as_strided", "torch.manual_seed"]

# Two sizes, chosen by NNGLASS_FUZZ: "ci" (the default, what `make test` runs: fixed
# seeds, derandomized) and "long" (`make fuzz`: 20x the cases, random seeds). Each
# property asks `cases(n)` for its share at the CI size. A case past `deadline_s` fails as
# a hang. Generous: it catches a stuck decoder or server and is no speed test; a case of
# milliseconds took 13.6 s in a long run niced on a loaded machine (the server, niced too,
# starved of CPU: the replay took 13 ms), which a 10 s deadline failed as flaky.
PROFILE = os.environ.get("NNGLASS_FUZZ", "ci")
FACTOR = {"ci": 1, "long": 20}[PROFILE]
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]


def cases(n: int, deadline_s: float = 60.0) -> settings:
    """Settings for a property with `n` cases at the CI size."""
    return settings(max_examples=n * FACTOR, derandomize=PROFILE == "ci", deadline=deadline_s * 1000,
                    suppress_health_check=_QUIET, database=None, print_blob=True)


Recorded = list[tuple[Doc, bytes | None]]  # (graph JSON data, safetensors bytes)

# Numbers that find off-by-ones and overflow: the 64-bit edges, floats past int range.
EDGE_INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]
scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
)


def _resolve(ref: str) -> Any:
    node: Any = SCHEMA
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def from_schema(node: Any = SCHEMA, budget: int = 6) -> st.SearchStrategy[Any]:
    """Instances of the schema `node` (nesting bounded by `budget`)."""
    if "$ref" in node:
        if budget <= 0:
            return scalars
        return st.deferred(lambda: from_schema(_resolve(node["$ref"]), budget - 1))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            base = {k: v for k, v in node.items() if k != key}
            merged = [{**base, **alt, "required": base.get("required", []) + alt.get("required", [])}
                      for alt in node[key]]
            return st.one_of([from_schema(m, budget) for m in merged])
    kind = node.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**node, "type": k}, budget) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        ints = st.integers(min_value=node.get("minimum"), max_value=None).filter(lambda n: n < 2**64)
        small = st.integers(min_value=max(node.get("minimum", -3), -3), max_value=40)
        out = st.one_of(small, ints)
        return out if kind == "integer" else st.one_of(out, st.floats(allow_nan=False, allow_infinity=False))
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) < 200)
        return st.one_of(st.text(max_size=16), st.sampled_from(OPS))
    if kind == "array":
        items = from_schema(node.get("items", {}), budget - 1) if budget > 0 else scalars
        return st.lists(items, max_size=4 if budget > 2 else 2)
    if kind == "object" or "properties" in node:
        return _object(node, budget)
    return scalars


def _object(node: Any, budget: int) -> st.SearchStrategy[Doc]:
    props = node.get("properties", {})
    required = [k for k in node.get("required", []) if k in props]
    optional = {k: v for k, v in props.items() if k not in required}
    extra = node.get("additionalProperties", True)
    fixed = st.fixed_dictionaries({k: from_schema(props[k], budget) for k in required},
                                  optional={k: from_schema(v, budget) for k, v in optional.items()})
    if isinstance(extra, dict) and budget > 0:
        names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=8)
        rest = st.dictionaries(names, from_schema(extra, budget - 1), max_size=3)
        return st.builds(lambda a, b: {**b, **a}, fixed, rest)
    return fixed


def plausible(doc: Any) -> Any:
    """A generated document made to pass the first checks (version, model, node ids in
    order), so that the checks behind them are reached too."""
    if isinstance(doc, dict):
        doc.update(version="1.0", model="tiny")
        for i, node in enumerate(doc.get("nodes", [])):
            node["id"] = i
    return doc


schema_documents = st.one_of(from_schema(), from_schema().map(plausible))


# --- mutations of a recorded graph --------------------------------------------------------


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) into `doc`, the root included."""
    out, stack = [], [(doc, prefix)]
    while stack:
        x, p = stack.pop()
        out.append(p)
        if isinstance(x, dict):
            stack.extend((v, (*p, k)) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend((v, (*p, i)) for i, v in enumerate(x))
    return out


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple) -> Any:
    if not path:
        return doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return doc


def nested(depth: int, leaf: Any = 0) -> Any:
    """A value `depth` levels deep, built without recursion."""
    out = leaf
    for i in range(depth):
        out = [out] if i % 2 else {"$": "tuple", "items": [out]}
    return out


replacements = st.one_of(
    scalars, from_schema(SCHEMA["$defs"]["value"], 3), st.sampled_from(OPS),
    st.builds(lambda i: {"$": "ref", "id": i}, st.integers(-2, 60)),
    st.builds(lambda k: {"$": "tensor", "key": k}, st.sampled_from(["t0", "t1", "nope", "../x", ""])),
    st.builds(nested, st.integers(20, 80)), st.builds(dict), st.builds(list),
    st.builds(lambda n: "x" * n, st.sampled_from([4096, 4097, 70_000])),
)


def _nodes(doc: Any) -> list:
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    return nodes if isinstance(nodes, list) else []


def mutate(doc: Any, action: str, path: tuple = (), value: Any = None, key: str = "") -> Any:
    """`doc` with one change: `value` put at `path` ("replace") or under `key` of the root
    ("add"), or the value at `path` removed ("delete"). The value goes in as a copy: a
    strategy may hand the same object to many draws (`st.just`, `st.sampled_from`), and
    the next change, made in place, would then reach into other cases, or make a
    document that contains itself (tests/fuzz/test_strategies.py)."""
    value = copy.deepcopy(value)
    if action == "replace":
        return _set(doc, path, value)
    if action == "delete":
        return _delete(doc, path)
    if action == "add" and isinstance(doc, dict):
        doc[key] = value
    return doc


ROOT_KEYS = ["extra", "$", "op", "id", "save", "site"]


@st.composite
def mutated_json(draw: st.DrawFn, recorded: list[tuple[Doc, bytes | None]]) -> tuple[Doc, bytes | None]:
    """One recorded graph with one to three changes to its JSON part."""
    doc, tensors = draw(st.sampled_from(recorded))
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "op", "dup"]))
        if action == "replace":
            doc = mutate(doc, action, path, draw(replacements))
        elif action == "delete":
            doc = mutate(doc, action, path)
        elif action == "add" and isinstance(doc, dict):
            doc = mutate(doc, action, value=draw(replacements), key=draw(st.sampled_from(ROOT_KEYS)))
        elif action == "op" and _nodes(doc):
            node = draw(st.sampled_from(doc["nodes"]))
            if isinstance(node, dict):
                node["op"] = draw(st.one_of(st.sampled_from(OPS), st.sampled_from(FORBIDDEN)))
        elif action == "dup" and _nodes(doc):
            doc["nodes"].append(json.loads(json.dumps(draw(st.sampled_from(doc["nodes"])))))
    return doc, tensors


@st.composite
def mutated_tensors(draw: st.DrawFn, recorded: list[tuple[Doc, bytes | None]]) -> tuple[Doc, bytes | None]:
    """One recorded graph with attached tensors whose manifest or safetensors bytes lie."""
    doc, blob = draw(st.sampled_from([r for r in recorded if r[1] is not None]))
    doc = json.loads(json.dumps(doc))
    assert blob is not None
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    action = draw(st.sampled_from(["shape", "dtype", "offsets", "length", "truncate", "junk", "manifest",
                                   "none", "extra"]))
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if action == "shape":
        header[key]["shape"] = draw(st.lists(st.sampled_from([0, 1, 3, 2**31, 2**62, -1]), max_size=4))
    elif action == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(["F32", "F64", "I64", "BOOL", "U8", "F8_E4M3", "X", ""]))
    elif action == "offsets":
        header[key]["data_offsets"] = draw(st.lists(st.sampled_from([0, 4, -1, 2**40, 2**64]), max_size=3))
    elif action == "extra":
        header[draw(st.sampled_from(["other", key + "x", "__metadata__"]))] = draw(replacements)
    if action in ("shape", "dtype", "offsets", "extra"):
        text = json.dumps(header).encode()
        blob = struct.pack("<Q", len(text)) + text + data
    elif action == "length":
        blob = struct.pack("<Q", draw(st.sampled_from([0, 1, n - 1, n + 1, 2**40, 2**64 - 1]))) + blob[8:]
    elif action == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif action == "junk":
        blob = blob + draw(st.binary(min_size=1, max_size=64))
    elif action == "manifest":
        doc["tensors"] = draw(from_schema(SCHEMA["$defs"]["manifest"], 3))
    elif action == "none":
        blob = None
    return doc, blob
