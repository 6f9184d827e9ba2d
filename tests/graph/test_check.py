"""The validator: hostile or broken graphs are refused with a clear GraphError that names
the node and the user's line; nothing recurses on client data; nothing is imported."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
import torch

from nnglass.errors import GraphError, VersionError
from nnglass.graph.check import DEFAULT_LIMITS, Limits, check
from nnglass.graph.document import load_json
from nnglass.graph.ir import Graph, Invoke, Node, Ref, Site, TensorRef
from nnglass.graph.ops import OpRegistry
from nnglass.graph.wire import decode, encode

GET0 = {"id": 0, "op": "get", "site": {"path": "layer1", "kind": "output", "call": 0, "step": 0}}


def doc(*nodes: dict[str, Any], **top: Any) -> bytes:
    """A graph document: node 0 is a getter, then `nodes` (ids filled in)."""
    body = [GET0] + [{"id": i + 1, "where": f"exp.py:{i + 1}", **n} for i, n in enumerate(nodes)]
    return json.dumps({"version": "1.0", "model": "net", "nodes": body, **top}).encode()


def refused(raw: bytes | str, match: str, **kw: Any) -> GraphError:
    with pytest.raises(GraphError, match=match) as e:
        decode(raw.encode() if isinstance(raw, str) else raw, **kw)
    return e.value


def test_a_valid_document_decodes() -> None:
    g = decode(doc({"op": "Tensor.sum", "args": [{"$": "ref", "id": 0}], "save": True}))
    assert [n.op for n in g.nodes] == ["get", "Tensor.sum"] and g.nodes[1].save is True


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"version": "1.0", "model": "m", "nodes": [}', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b'{"version": "1.0", "model": "m", "nodes": [], "options": {"x": NaN}}', "NaN"),
        (b'{"version": "1.0", "model": "m", "nodes": [], "options": {"x": 1e400}}', "overflows"),
        (b'{"version": "1.0", "version": "1.0", "model": "m", "nodes": []}', "duplicate key"),
        (b'{"version": "1.0", "model": "m", "nodes": [], "options": {"x": ' + b"9" * 5000 + b"}}",
         "not valid JSON"),
    ],
)
def test_malformed_json(raw: bytes, match: str) -> None:
    refused(raw, match)


@pytest.mark.parametrize("opener", ["[", "{\"a\":", "[{\"$\":\"tuple\",\"items\":"])
def test_deep_nesting_is_refused_before_json_loads_recurses(opener: str) -> None:
    n = 100_000
    raw = ('{"version":"1.0","model":"m","nodes":[],"options":{"x":' + opener * n).encode()
    start = time.perf_counter()
    refused(raw, "nests deeper")
    assert time.perf_counter() - start < 2


def test_brackets_inside_strings_do_not_count() -> None:
    tricky = '[[[{{{ \\" ]]] \\\\' * 200
    g = decode(doc({"op": "operator.getitem", "args": [{"$": "ref", "id": 0}, tricky]}))
    assert g.nodes[1].args[1] == tricky  # 600 '[' inside a string, escaped quotes among them


def test_values_deeper_than_the_limit_are_refused_after_parsing() -> None:
    value: Any = 0
    for _ in range(DEFAULT_LIMITS.max_depth + 1):
        value = [value]
    e = refused(doc({"op": "torch.tensor", "args": [value]}), "deeper than 32")
    assert "node 1" in str(e) and "exp.py:1" in str(e)


def test_recursion_limit_is_never_hit() -> None:
    deep = "[" * (sys.getrecursionlimit() * 20) + "]" * (sys.getrecursionlimit() * 20)
    for raw in (deep, '{"a":' * 50_000, '"' + "\\" * 100_001):
        with pytest.raises(GraphError):
            load_json(raw.encode())


def test_json_size_limit() -> None:
    refused(doc(), "over the limit", limits=Limits(max_json_bytes=50))


# -- version ------------------------------------------------------------------------------


def test_another_major_version_names_both() -> None:
    raw = json.dumps({"version": "2.0", "bogus": True}).encode()  # checked before structure
    with pytest.raises(VersionError, match=r"graph version 2\.0, this side speaks 1\.x"):
        decode(raw)
    with pytest.raises(VersionError, match=r"0\.9"):
        decode(json.dumps({"version": "0.9"}).encode())


@pytest.mark.parametrize("version", [None, 1, 1.0, "1", "v1.0", "1.0.0", "\uff11.\uff10", "1." + "0" * 9])
def test_malformed_versions(version: object) -> None:
    refused(json.dumps({"version": version, "model": "m", "nodes": []}), "version")


def test_a_newer_minor_version_is_accepted_only_if_it_validates() -> None:
    assert decode(doc(version="1.7")).version == "1.7"
    e = refused(doc(version="1.7", novelty=1), "unknown field 'novelty'")
    assert not isinstance(e, VersionError)


# -- structure ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"op": "get", "extra": 1}, "unknown field 'extra'"),
        ({"op": 3}, "field 'op' must be a string"),
        ({"op": "Tensor.sum", "args": [{"$": "ref", "id": 0}], "save": 1}, "'save' must be true/false"),
        ({"op": "Tensor.sum", "args": [{"$": "ref", "id": 0}], "step": 1.0}, "'step' must be an integer"),
        ({"op": "Tensor.sum", "args": {"a": 1}}, "'args' must be an array"),
        ({"op": "get", "site": {"path": "a", "kind": "output"}}, "lacks required"),
        ({"op": "get", "site": {"path": "a", "kind": "weights", "call": 0, "step": 0}}, "site kind"),
        ({"op": "get", "site": {"path": "a", "kind": "output", "call": -1, "step": 0}}, "call must"),
        ({"op": "Tensor.sum", "args": [{"$": "ref", "id": 0}], "invoke": 0}, "invoke 0 does not"),
        ({"op": "torch.tensor", "args": [{"x": 1}]}, "must be tagged"),
        ({"op": "torch.tensor", "args": [{"$": "pickle", "v": "gASV"}]}, "must be tagged"),
        ({"op": "torch.tensor", "args": [{"$": "tuple", "items": [], "x": 1}]}, "exactly the fields"),
        ({"op": "torch.tensor", "args": [{"$": "tuple", "items": {}}]}, "items must be an array"),
        ({"op": "torch.tensor", "args": [{"$": ["tuple"], "items": []}]}, "must be tagged"),
        ({"op": "torch.tensor", "args": [{"$": "dtype", "name": "os"}]}, "bad tagged dtype"),
        ({"op": "torch.tensor", "args": [{"$": "device", "name": "cuda; rm -rf /"}]}, "device"),
        ({"op": "torch.tensor", "args": [{"$": "size", "dims": [-1]}]}, "bad tagged size"),
        ({"op": "torch.tensor", "args": [{"$": "ref", "id": True}]}, "bad tagged ref"),
        ({"op": "torch.tensor", "args": [{"$": "float", "v": "1e999"}]}, "bad tagged float"),
        ({"op": "torch.tensor", "args": [2**64]}, "64 bits"),
        ({"op": "torch.tensor", "args": ["x" * 5000]}, "longer than 4096"),
    ],
)
def test_structure(node: dict[str, Any], match: str) -> None:
    e = refused(doc(node), match)
    assert "node 1" in str(e)


def test_ids_must_be_0_to_n_minus_1_in_order() -> None:
    raw = json.dumps({"version": "1.0", "model": "m", "nodes": [GET0, {**GET0, "id": 0}]})
    refused(raw, "node ids must be 0..n-1")
    refused(json.dumps({"version": "1.0", "model": "m", "nodes": [{**GET0, "id": True}]}), "'id'")


@pytest.mark.parametrize(
    ("top", "match"),
    [
        ({"mode": "exec"}, "mode 'exec'"),
        ({"surprise": 1}, "unknown field 'surprise'"),
        ({"model": None}, "'model' must be a string"),
        ({"options": {"x": {"$": "ref", "id": 0}}}, "options: references"),
        ({"invokes": [{"args": [{"$": "ref", "id": 0}]}]}, "invoke 0: references"),
        ({"invokes": [{"args": [], "env": {}}]}, "unknown field 'env'"),
        ({"tensors": {"t0": {"dtype": "object", "shape": [1]}}}, "cannot travel"),
        ({"tensors": {"t0": {"dtype": "float32", "shape": [-1]}}}, "non-negative"),
    ],
)
def test_top_level_structure(top: dict[str, Any], match: str) -> None:
    refused(doc(**top), match)


def test_count_limits() -> None:
    many = [{"op": "get", "site": GET0["site"]}] * 10
    refused(doc(*many), "11 nodes, over the limit of 10", limits=Limits(max_nodes=10))
    refused(doc(invokes=[{}] * 3), "3 invokes, over the limit of 2", limits=Limits(max_invokes=2))
    huge = b'{"version":"1.0","model":"m","nodes":[' + b",".join([b"{}"] * 100_001) + b"]}"
    start = time.perf_counter()
    refused(huge, "100001 nodes, over the limit of 100000")
    assert time.perf_counter() - start < 2


# -- ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    ["os.system", "builtins.eval", "builtins.exec", "__import__", "builtins.__import__",
     "torch._C.x", "torch._C._set_grad_enabled", "torch.load", "torch.save", "torch.manual_seed",
     "torch.set_num_threads", "Tensor.data_ptr", "Tensor.untyped_storage", "Tensor.set_",
     "Tensor.as_strided", "Tensor.__reduce_ex__", "subprocess.run", "builtins.open",
     "torch..add", "torch.add.", "", "pickle.loads", "nnglass.graph.ops.register"],
)
def test_unknown_or_forbidden_ops(op: str) -> None:
    e = refused(doc({"op": op, "args": [{"$": "ref", "id": 0}]}), r"unknown op|op names|op must")
    assert str(e).startswith("node 1 (") and str(e).endswith("at exp.py:1")


def test_unknown_op_message_is_plain() -> None:
    e = refused(doc({"op": "os.system", "args": ["rm -rf /"]}), "unknown op")
    assert str(e).startswith("node 1 ('os.system'): unknown op") and "at exp.py:1" in str(e)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ([{"$": "ref", "id": 0}, "__class__"], {}),
        ([{"$": "ref", "id": 0}, "__dict__"], {}),
        ([{"$": "ref", "id": 0}, "weight"], {}),
        ([{"$": "ref", "id": 0}, "data"], {}),
        ([{"$": "ref", "id": 0}, {"$": "ref", "id": 0}], {}),
        ([{"$": "ref", "id": 0}], {"name": "shape"}),
        ([{"$": "ref", "id": 0}, "shape", None], {}),
    ],
)
def test_getattr_reads_only_listed_attributes(args: list, kwargs: dict) -> None:
    e = refused(doc({"op": "builtins.getattr", "args": args, "kwargs": kwargs}), "not allowed")
    assert "'param'" in str(e)


def test_getattr_of_a_listed_attribute_is_fine() -> None:
    decode(doc({"op": "builtins.getattr", "args": [{"$": "ref", "id": 0}, "shape"]}))


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"op": "Tensor.sum", "site": GET0["site"], "args": [{"$": "ref", "id": 0}]}, "only get and set"),
        ({"op": "grad", "site": GET0["site"], "args": [{"$": "ref", "id": 0}]}, "need a site"),
        ({"op": "get"}, "need a site"),
        ({"op": "get", "site": GET0["site"], "args": [1]}, "get takes no arguments"),
        ({"op": "set", "site": GET0["site"]}, "exactly one argument"),
        ({"op": "grad", "args": [1]}, "reference to an earlier node"),
        ({"op": "backward", "args": []}, "reference to an earlier node"),
        ({"op": "param", "args": [""]}, "literal path"),
        ({"op": "param", "args": [{"$": "ref", "id": 0}]}, "literal path"),
        ({"op": "param", "args": ["layers.0._parameters"]}, "literal path"),
        ({"op": "module", "args": ["_orig_mod.layer1"]}, "literal path"),
        ({"op": "module", "args": []}, "literal path"),
        *[({"op": "get", "site": {**GET0["site"], "path": p}}, "bad module path")
          for p in ["_private", "a..b", "layers.__class__", "a.b-c", "a.", ".a", "lay ers", "é"]],
    ],
)
def test_opcode_rules(node: dict[str, Any], match: str) -> None:
    refused(doc(node), match)


def test_a_server_registry_is_its_own() -> None:
    raw = doc({"op": "torch.add", "args": [{"$": "ref", "id": 0}, 1]})
    decode(raw)
    refused(raw, "unknown op", registry=OpRegistry({}))


# -- references ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "match"),
    [(1, "refers to itself"), (2, "refers to node 2, which does not come before"),
     (-1, "bad tagged ref")],
)
def test_references_point_backwards(ref: int, match: str) -> None:
    e = refused(doc({"op": "Tensor.sum", "args": [{"$": "ref", "id": ref}]}, {"op": "get",
                "site": GET0["site"]}), match)
    assert "node 1" in str(e) and "exp.py:1" in str(e)


def test_refs_hide_in_containers_too() -> None:
    nested = {"$": "dict", "items": {"k": [{"$": "slice", "start": None,
              "stop": {"$": "ref", "id": 5}, "step": None}]}}
    refused(doc({"op": "operator.getitem", "args": [{"$": "ref", "id": 0}, nested]}), "node 5")


def test_tensor_references_must_exist() -> None:
    refused(doc({"op": "torch.add", "args": [{"$": "ref", "id": 0}, {"$": "tensor", "key": "t9"}]}),
            "attached tensor 't9'")


# -- in-memory graphs ---------------------------------------------------------------------


def graph_with(*nodes: Node) -> Graph:
    g = Graph(model="net")
    g.add("get", site=Site("layer1", "output"), where="exp.py:1")
    g.nodes.extend(nodes)
    return g


def test_check_accepts_a_local_graph() -> None:
    g = graph_with(Node(1, "torch.add", (Ref(0), TensorRef("t0")), where="exp.py:2"))
    g.tensors["t0"] = torch.ones(2)
    g.invokes.append(Invoke((torch.Size([2]),), {"use_cache": False}))
    check(g)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        (Node(1, "torch.add", (Ref(0), torch.ones(2))), "attach it with graph.attach"),
        (Node(1, "torch.add", (Ref(0), object())), "builtins.object"),
        (Node(1, "torch.add", (Ref(0), {1: 2})), "dict keys must be str"),
        (Node(1, "torch.add", (Ref(0), 1.5j)), "builtins.complex"),
        (Node(1, "torch.add", [Ref(0)]), "args must be a tuple"),
        (Node(1, "torch.add", (Ref(1),)), "refers to itself"),
        (Node(1, "torch.add", (Ref(True),)), "must be an int"),
        (Node(2, "torch.add", (Ref(0),)), "node ids must be 0..n-1"),
        (Node(1, "Tensor.to", (Ref(0), torch.qint8)), "cannot travel"),
        (Node(1, "Tensor.view", (Ref(0), torch.Size([-1]))), "non-negative"),
        (Node(1, "get", site=Site("layer1", "output", step=-2)), "step an int >= -1"),
    ],
)
def test_check_refuses_bad_local_graphs(node: Node, match: str) -> None:
    node.where = "exp.py:9"
    with pytest.raises(GraphError, match=match) as e:
        check(graph_with(node))
    assert "exp.py:9" in str(e.value)


def test_check_refuses_cyclic_and_deep_local_values() -> None:
    cyclic: list = []
    cyclic.append(cyclic)
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    for value in (cyclic, deep):
        with pytest.raises(GraphError, match="deeper"):
            check(graph_with(Node(1, "torch.tensor", (value,), where="x.py:1")))


def test_check_bounds_attached_tensors() -> None:
    g = graph_with()
    g.tensors["t0"] = torch.ones(100)
    with pytest.raises(GraphError, match="400 bytes of attached tensors, over the limit of 100"):
        check(g, limits=Limits(max_tensor_bytes=100))
    g.tensors = {"../x": torch.ones(1)}
    with pytest.raises(GraphError, match="alphanumeric"):
        check(g)
    g.tensors = {"t0": torch.ones(1, dtype=torch.complex128)}
    with pytest.raises(GraphError, match="cannot travel"):
        check(g)


def test_encode_then_decode_checks_what_check_checks() -> None:
    g = graph_with(Node(1, "os.system", ("ls",), where="evil.py:1"))
    raw, blob = encode(g)  # encoding is plain data; the receiver decides
    with pytest.raises(GraphError, match="unknown op"):
        decode(raw, blob)


# -- sessions -----------------------------------------------------------------------------


def session(*second: Node, first_nodes: int = 2) -> Graph:
    """A session of two traces; the second gets `second` after its own getter (node 0)."""
    first = graph_with(*[Node(i, "Tensor.sum", (Ref(0),)) for i in range(1, first_nodes)])
    return Graph(model="net", mode="session", children=[first, graph_with(*second)])


def test_a_session_may_import_earlier_values() -> None:
    g = session(Node(1, "import", (0, 1), where="s.py:2"),
                Node(2, "torch.add", (Ref(0), Ref(1)), where="s.py:3"))
    check(g)
    assert decode(*encode(g)).children[1].nodes[1].args == (0, 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 0), "earlier trace"),  # itself
        ((2, 0), "earlier trace"),  # a later one
        ((0, 2), "node id in it"),  # no such node
        ((0, -1), "node id in it"),
        ((True, 0), "earlier trace"),
        ((0,), "earlier trace"),
        ((0, Ref(0)), "earlier trace"),
    ],
)
def test_imports_name_an_earlier_trace_and_an_existing_node(args: tuple, match: str) -> None:
    with pytest.raises(GraphError, match=match) as e:
        check(session(Node(1, "import", args, where="s.py:4")))
    assert str(e.value).startswith("trace 1: node 1 ('import')") and "s.py:4" in str(e.value)


def test_import_outside_a_session_is_refused() -> None:
    with pytest.raises(GraphError, match="only valid in a trace of a session"):
        check(graph_with(Node(1, "import", (0, 0))))


def test_session_structure() -> None:
    g = session()
    g.nodes.append(Node(0, "get", site=Site("a", "output")))
    with pytest.raises(GraphError, match="own nodes, invokes and tensors must be empty"):
        check(g)
    nested = Graph(model="net", mode="session", children=[session()])
    with pytest.raises(GraphError, match="cannot be nested"):
        check(nested)
    with pytest.raises(GraphError, match="only a session has child traces"):
        check(Graph(model="net", children=[graph_with()]))
    with pytest.raises(GraphError, match="12 nodes, over the limit of 10"):
        check(session(first_nodes=11), limits=Limits(max_nodes=10))  # the traces share it
    with pytest.raises(GraphError, match="3 traces, over the limit of 2"):
        check(Graph(model="net", mode="session", children=[graph_with()] * 3),
              limits=Limits(max_children=2))


def test_session_documents() -> None:
    raw, _ = encode(session(Node(1, "import", (0, 1))))
    doc = json.loads(raw)
    bad = {**doc, "children": [{**doc["children"][0], "version": "1.0"}]}
    refused(json.dumps(bad), "trace 0 has unknown field 'version'")
    bad = {**doc, "children": [{**doc["children"][0], "children": []}]}
    refused(json.dumps(bad), "trace 0 has unknown field 'children'")
    child = doc["children"][1]
    bad = {**doc, "children": [doc["children"][0], {**child, "nodes": child["nodes"] + [
        {"id": 2, "op": "os.system", "where": "s.py:9"}]}]}
    e = refused(json.dumps(bad), "trace 1: node 2 .*unknown op")
    assert "s.py:9" in str(e)
