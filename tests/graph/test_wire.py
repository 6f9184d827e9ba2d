"""The wire codec: values and graphs survive JSON + safetensors bit for bit, and the
golden graphs in tests/graph/golden/ keep the format from changing by accident.

Regenerate the golden files (only for a deliberate, versioned format change) with
`python tests/graph/test_wire.py`.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from nnglass.errors import GraphError
from nnglass.graph.check import DTYPES, Limits
from nnglass.graph.ir import ALL_STEPS, Graph, Invoke, Ref, Site, TensorRef
from nnglass.graph.wire import SCHEMA_PATH, decode, decode_value, encode, encode_value, roundtrip

GOLDEN = Path(__file__).with_name("golden")


# -- strict comparison (types, float bits, tensor bits) -----------------------------------


def same(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
            a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, slice):
        return all(same(getattr(a, f), getattr(b, f)) for f in ("start", "stop", "step"))
    return a == b


def same_graph(a: Graph, b: Graph) -> bool:
    head = (a.version, a.model, a.mode) == (b.version, b.model, b.mode)
    invokes = len(a.invokes) == len(b.invokes) and all(
        same(x.args, y.args) and same(x.kwargs, y.kwargs) for x, y in zip(a.invokes, b.invokes)
    )
    nodes = len(a.nodes) == len(b.nodes) and all(
        (x.id, x.op, x.site, x.invoke, x.step, x.save, x.where)
        == (y.id, y.op, y.site, y.invoke, y.step, y.save, y.where)
        and same(x.args, y.args)
        and same(x.kwargs, y.kwargs)
        for x, y in zip(a.nodes, b.nodes)
    )
    children = len(a.children) == len(b.children) and all(
        same_graph(x, y) for x, y in zip(a.children, b.children)
    )
    rest = same(a.options, b.options) and same(a.tensors, b.tensors)
    return head and invokes and nodes and children and rest


# -- values -------------------------------------------------------------------------------

VALUES = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 1.0, 0.0, -0.0, 0.1, 1e300, 5e-324,
    math.nan, math.inf, -math.inf, "", 'héllo ☃ "quoted" \\ \n', [], (), [[]], ((),),
    [1, (2, 3)], ((1,), [1]), (1,), {}, {"a": (1, [2.5])}, {"$": "tuple", "items": []},
    slice(None), slice(1, None, 2), slice(None, Ref(0)), slice(-1, -3, -1), Ellipsis,
    (Ellipsis, slice(None), None, 0), torch.device("cpu"), torch.device("cuda:1"),
    torch.Size([]), torch.Size([2, 3]), Ref(3), TensorRef("t0"), [True, 1, 1.0, "1"],
    *DTYPES.values(),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_value_round_trips_through_json_text(value: object) -> None:
    text = json.dumps(encode_value(value), allow_nan=False)
    assert same(decode_value(json.loads(text)), value)


def test_bool_int_float_stay_distinct() -> None:
    back = decode_value(json.loads(json.dumps(encode_value([True, 1, 1.0, False, 0, 0.0]))))
    assert [type(x) for x in back] == [bool, int, float, bool, int, float]
    assert decode_value(json.loads("1.0")) == 1.0 and type(decode_value(json.loads("1.0"))) is float


def test_tuple_and_list_encode_differently() -> None:
    assert encode_value([1]) == [1]
    assert encode_value((1,)) == {"$": "tuple", "items": [1]}
    assert encode_value(math.nan) == {"$": "float", "v": "nan"}


def test_dtypes_come_from_the_table_only() -> None:
    assert decode_value({"$": "dtype", "name": "bfloat16"}) is torch.bfloat16
    for name in ["float", "Tensor", "__class__", "load", "qint8"]:
        with pytest.raises(GraphError, match="dtype"):
            decode_value({"$": "dtype", "name": name})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1: "a"}, "dict keys must be str"),
        ({("a",): 1}, "dict keys must be str"),
        (torch.ones(2), "attach it"),
        ([torch.ones(2)], "attach it"),
        (object(), "builtins.object"),
        ({1, 2}, "builtins.set"),
        (b"raw", "builtins.bytes"),
        (torch.qint8, "cannot travel"),
    ],
)
def test_encode_refuses_what_cannot_travel(value: object, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        encode_value(value)


def test_encode_refuses_cycles_and_deep_values_without_recursing() -> None:
    cyclic: list = []
    cyclic.append(cyclic)
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    for value in (cyclic, deep):
        with pytest.raises(GraphError, match="deeper"):
            encode_value(value)


def test_tensors_attach_and_resolve_for_results() -> None:
    store: dict[str, torch.Tensor] = {}

    def attach(t: torch.Tensor) -> TensorRef:
        store[f"r{len(store)}"] = t
        return TensorRef(f"r{len(store) - 1}")

    t = torch.arange(4)
    obj = encode_value({"h": (t, 1)}, attach=attach)
    assert obj == {"$": "dict", "items": {"h": {"$": "tuple", "items": [{"$": "tensor", "key": "r0"}, 1]}}}
    assert same(decode_value(obj, tensors=store), {"h": (t, 1)})
    with pytest.raises(GraphError, match="did not come"):
        decode_value({"$": "tensor", "key": "zz"}, tensors=store)


# -- tensors ------------------------------------------------------------------------------


def _tensor_graph(tensors: list[torch.Tensor]) -> Graph:
    g = Graph(model="net")
    refs = [g.attach(t) for t in tensors]
    g.add("torch.stack", (refs,), where="t.py:1")
    return g


def test_tensors_round_trip_bitwise() -> None:
    f32 = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38])
    f32[0] = struct.unpack("<f", struct.pack("<I", 0x7FC00123))[0]  # a NaN payload
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = [
        f32,
        torch.tensor([1.5, -0.0, math.nan], dtype=torch.bfloat16),
        torch.tensor([65504.0, -0.0], dtype=torch.float16),
        torch.tensor([2**63 - 1, -(2**63), 0]),
        torch.tensor([True, False, True]),
        torch.tensor([0, 255], dtype=torch.uint8),
        torch.tensor([1 + 2j, -0.0j], dtype=torch.complex64),
        torch.tensor(3.25),  # 0-dim
        torch.zeros(0, 3),  # empty
        base.t(),  # not contiguous
        base[1:3, 2:],  # a view into a larger storage
        base,  # shares storage with the two above
        torch.ones(3, requires_grad=True),
    ]
    back = roundtrip(_tensor_graph(tensors))
    assert list(back.tensors) == [f"t{i}" for i in range(len(tensors))]
    for t, b in zip(tensors, back.tensors.values()):
        assert same(t.detach().contiguous(), b)
        assert not b.requires_grad
    json_bytes, blob = encode(_tensor_graph(tensors))
    assert blob is not None and b"65504" not in json_bytes  # tensors never travel as JSON


def test_no_tensors_means_no_tensor_part() -> None:
    assert encode(Graph(model="m"))[1] is None


def test_manifest_must_match_the_safetensors_part() -> None:
    j, blob = encode(_tensor_graph([torch.ones(2, 3), torch.zeros(4, dtype=torch.int64)]))
    _, other = encode(_tensor_graph([torch.ones(2, 3, dtype=torch.float16), torch.zeros(4)]))
    _, fewer = encode(_tensor_graph([torch.ones(2, 3)]))
    with pytest.raises(GraphError, match="manifest says float32"):
        decode(j, other)
    with pytest.raises(GraphError, match="missing from the data"):
        decode(j, fewer)
    with pytest.raises(GraphError, match="no tensor data"):
        decode(j, None)
    with pytest.raises(GraphError, match="not valid safetensors"):
        decode(j, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(GraphError, match="over the limit"):
        decode(j, blob, limits=Limits(max_tensor_bytes=16))
    doc = json.loads(j)
    doc["tensors"]["t0"]["shape"] = [3, 2]
    with pytest.raises(GraphError, match=r"manifest says float32 \[3, 2\]"):
        decode(json.dumps(doc).encode(), blob)
    assert same_graph(decode(j, blob), roundtrip(decode(j, blob)))


# -- graphs -------------------------------------------------------------------------------


def test_default_node_fields_are_omitted() -> None:
    g = Graph(model="m")
    g.add("get", site=Site("layer1", "output"))
    g.add("Tensor.sum", (Ref(0),), {"dim": -1}, save=True, where="x.py:3")
    nodes = json.loads(encode(g)[0])["nodes"]
    assert nodes == [
        {"id": 0, "op": "get", "site": {"path": "layer1", "kind": "output", "call": 0, "step": 0}},
        {"id": 1, "op": "Tensor.sum", "args": [{"$": "ref", "id": 0}], "kwargs": {"dim": -1},
         "save": True, "where": "x.py:3"},
    ]


def test_encode_errors_name_the_node_and_line() -> None:
    g = Graph(model="m")
    g.add("get", site=Site("layer1", "output"))
    g.add("torch.add", (Ref(0), torch.ones(2)), where="exp.py:7")
    with pytest.raises(GraphError, match=r"node 1 .*attach it") as e:
        encode(g)
    assert "exp.py:7" in str(e.value)


def golden_graphs() -> dict[str, Graph]:
    getter = Graph(model="net")
    getter.add("get", site=Site("layer1", "output"), where="experiment.py:10")
    getter.add("operator.getitem", (Ref(0), (slice(None), 0)), where="experiment.py:11")
    getter.add("builtins.getattr", (Ref(1), "shape"), save=True, where="experiment.py:11")
    getter.add("Tensor.sum", (Ref(1),), {"dim": -1, "keepdim": True}, save=True, where="experiment.py:12")
    getter.add("get", site=Site("", "output"), save=True, where="experiment.py:13")

    setter = Graph(model="net")
    setter.add("get", site=Site("layers.2.mlp", "input", call=1), where="patch.py:4")
    setter.add("operator.setitem", (Ref(0), (Ellipsis, slice(0, 4, 2)), 0.0), where="patch.py:4")
    setter.add("set", (Ref(1),), site=Site("layers.2.mlp", "input", call=1), where="patch.py:4")
    setter.add("get", site=Site("layers.0", "output"), where="patch.py:5")
    setter.add("operator.getitem", (Ref(3), (slice(None), None, [1, 2])), save=True, where="patch.py:5")
    setter.add("torch.full", ((2,), -math.inf), {"dtype": torch.bfloat16, "device": torch.device("cpu")},
               save=True, where="patch.py:6")

    options = {"max_new_tokens": 3, "do_sample": False, "temperature": 1.0, "eos": None}
    gen = Graph(model="smollm2-135m", mode="generate", options=options)
    ids0 = gen.attach(torch.tensor([[1, 2, 3, 4]]))
    mask0 = gen.attach(torch.tensor([[1, 1, 1, 1]]))
    ids1 = gen.attach(torch.tensor([[5, 6, 7]]))
    steer = gen.attach(torch.linspace(-1, 1, 8, dtype=torch.bfloat16))
    gen.invokes += [Invoke((), {"input_ids": ids0, "attention_mask": mask0}), Invoke((ids1,), {})]
    site = Site("model.layers.1", "output", step=ALL_STEPS)
    gen.add("get", site=site, invoke=0, step=ALL_STEPS, where="steer.py:20")
    gen.add("Tensor.to", (steer,), {"dtype": torch.float32}, invoke=0, step=ALL_STEPS, where="steer.py:20")
    gen.add("operator.add", (Ref(0), Ref(1)), invoke=0, step=ALL_STEPS, where="steer.py:20")
    gen.add("set", (Ref(2),), site=site, invoke=0, step=ALL_STEPS, where="steer.py:20")
    gen.add("get", site=Site("lm_head", "output", step=2), invoke=1, step=2, where="steer.py:22")
    gen.add("torch.nan_to_num", (Ref(4),), {"nan": 0.0, "posinf": math.inf, "neginf": -math.inf},
            invoke=1, step=2, where="steer.py:22")
    gen.add("Tensor.argmax", (Ref(5),), {"dim": -1}, invoke=1, step=2, save=True, where="steer.py:22")
    gen.add("Tensor.view", (Ref(5), torch.Size([1, 8])), invoke=1, step=2, where="steer.py:23")
    gen.add("get", site=Site("", "result"), invoke=1, save=True, where="steer.py:24")

    grad = Graph(model="smollm2-135m")
    grad.add("get", site=Site("model.layers.10", "output"), where="grad.py:3")
    grad.add("grad", (Ref(0),), save=True, where="grad.py:4")
    grad.add("get", site=Site("", "output"), where="grad.py:5")
    grad.add("builtins.getattr", (Ref(2), "logits"), where="grad.py:5")
    grad.add("operator.getitem", (Ref(3), (0, -1)), where="grad.py:5")
    grad.add("Tensor.max", (Ref(4),), where="grad.py:5")
    grad.add("backward", (Ref(5),), where="grad.py:5")
    grad.add("param", ("model.layers.0.mlp.down_proj.weight",), save=True, where="grad.py:6")
    grad.add("module", ("lm_head", Ref(0)), save=True, where="grad.py:7")
    first = Graph(model="smollm2-135m")
    first.invokes.append(Invoke((first.attach(torch.tensor([[1, 2, 3]])),), {}))
    first.add("get", site=Site("model.layers.5", "output"), where="session.py:3")
    first.add("operator.getitem", (Ref(0), (slice(None), -1)), where="session.py:3")
    second = Graph(model="smollm2-135m")  # its own "t0": keys are per trace
    second.invokes.append(Invoke((second.attach(torch.tensor([[4, 5]])),), {}))
    second.add("import", (0, 1), where="session.py:6")
    second.add("get", site=Site("model.layers.5", "output"), where="session.py:6")
    second.add("operator.setitem", (Ref(1), (slice(None), -1), Ref(0)), where="session.py:6")
    second.add("set", (Ref(2),), site=Site("model.layers.5", "output"), where="session.py:6")
    second.add("get", site=Site("", "output"), save=True, where="session.py:7")
    session = Graph(model="smollm2-135m", mode="session", children=[first, second])
    return {"getter_save": getter, "setitem_slice": setter, "generate_tensors": gen,
            "grad_backward": grad, "session_import": session}


GOLDEN_NAMES = sorted(golden_graphs())


def _golden(name: str) -> tuple[bytes, bytes | None]:
    st = GOLDEN / f"{name}.safetensors"
    return (GOLDEN / f"{name}.json").read_bytes(), st.read_bytes() if st.exists() else None


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_encoding_matches_the_golden_bytes(name: str) -> None:
    json_bytes, blob = encode(golden_graphs()[name])
    golden_json, golden_blob = _golden(name)
    assert json_bytes == golden_json, "the wire format changed: bump WIRE_VERSION deliberately"
    assert (blob is None) == (golden_blob is None)
    if blob is not None:
        assert same(decode(json_bytes, blob).tensors, decode(golden_json, golden_blob).tensors)


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_files_decode_to_the_same_graph(name: str) -> None:
    graph = decode(*_golden(name))
    assert same_graph(graph, golden_graphs()[name])
    assert same_graph(roundtrip(graph), graph)


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_files_validate_against_the_published_schema(name: str) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(_golden(name)[0]))


def test_schema_rejects_what_decode_rejects() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    base = json.loads(_golden("getter_save")[0])
    bad = [
        {**base, "extra": 1},
        {**base, "version": "2.0"},
        {**base, "nodes": [{"id": 0, "op": "get", "args": [{"$": "pickle", "v": "x"}]}]},
        {**base, "nodes": [{"id": 0, "op": "get", "args": [{"x": 1}]}]},
        {**base, "nodes": [{"id": 0, "op": "get", "bogus": 1}]},
    ]
    for doc in bad:
        assert not validator.is_valid(doc)
        with pytest.raises(GraphError):
            decode(json.dumps(doc).encode())


def test_session_tensors_are_keyed_per_trace() -> None:
    json_bytes, blob = encode(golden_graphs()["session_import"])
    assert blob is not None
    from safetensors.torch import load

    assert sorted(load(blob)) == ["0/t0", "1/t0"]
    doc = json.loads(json_bytes)
    assert doc["nodes"] == [] and [c["tensors"] for c in doc["children"]] == [
        {"t0": {"dtype": "int64", "shape": [1, 3]}},
        {"t0": {"dtype": "int64", "shape": [1, 2]}},
    ]


def _deepest(depth: int) -> object:
    """A value whose innermost leaf (a Ref in a slice) sits `depth` levels down."""
    value: object = slice(None, Ref(0), None)
    for i in range(depth - 2):
        value = (value,) if i % 3 == 0 else [value] if i % 3 == 1 else {"k": value}
    return value


def test_the_deepest_allowed_value_travels_even_in_a_session() -> None:
    limits = Limits()
    trace = Graph(model="m")
    trace.add("get", site=Site("a", "output"))
    trace.add("operator.getitem", (Ref(0), _deepest(limits.max_depth)), {"k": _deepest(limits.max_depth)})
    session = Graph(model="m", mode="session", children=[trace])
    assert same_graph(roundtrip(session), session)
    trace.nodes[1].args = (Ref(0), [_deepest(limits.max_depth)])
    with pytest.raises(GraphError, match="deeper than 32"):
        roundtrip(session)


def write_golden() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, graph in golden_graphs().items():
        json_bytes, blob = encode(graph)
        (GOLDEN / f"{name}.json").write_bytes(json_bytes)
        if blob is not None:
            (GOLDEN / f"{name}.safetensors").write_bytes(blob)


if __name__ == "__main__":
    write_golden()
    sys.exit(0)
