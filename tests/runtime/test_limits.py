"""Run limits (runtime/limited.py, runtime/sizes.py): every op's size is known before it
runs, a run's held bytes are bounded, the deadline holds between nodes, Python integers
stay within 64 bits; each refusal names the user's line, the size and the limit.

Graphs are written node by node, as a hostile client would send them. "Refused before
it ran" is checked two ways: the requests ask for many GiB (a check after the fact would
run out of memory), and the op's callable is wrapped in a test registry that records
every call made outside the meta device (the meta run that sizes an op does not count).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from nnglass.errors import ExecutionError, ResourceLimitError, TimeLimitError
from nnglass.graph.ir import GET, Graph, Invoke, Ref, Site, TensorRef
from nnglass.graph.ops import REGISTRY, OpRegistry
from nnglass.runtime.interpreter import Interpreter, RunConfig
from nnglass.runtime.limited import LimitedInterpreter
from nnglass.runtime.limits import RunLimits
from nnglass.runtime.python_sizes import TENSOR_OBJECT
from nnglass.runtime.run import execute
from nnglass.runtime.sizes import made_bytes, small_bound

MiB = 2**20
GiB = 2**30
THIS = "test_limits.py"


class Spied:
    """A copy of the default registry whose ops record each real (non-meta) call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.registry = OpRegistry()
        for name in REGISTRY.names():
            self.registry.add(name, self._wrap(name, REGISTRY[name]))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.get_default_device().type != "meta":
                self.calls.append(name)
            return fn(*args, **kwargs)

        return call


class Build:
    """A graph on a Linear(4, 4) whose root output is node 0 (`self.h`, shape (2, 4))."""

    def __init__(self, x: torch.Tensor | None = None, width: int = 4) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(width, width)
        self.x = torch.randn(2, width) if x is None else x
        self.graph = Graph(model="m", invokes=[Invoke((TensorRef("x"),))], tensors={"x": self.x})
        self.h = self.add(GET, site=Site("", "output"))

    def add(self, op: str, *args: Any, save: bool = False, site: Site | None = None, **kwargs: Any) -> Ref:
        node = self.graph.add(op, args, kwargs, save=save, site=site, where=f"{THIS}:{len(self.graph.nodes)}")
        return Ref(node.id)

    def attach(self, t: torch.Tensor) -> TensorRef:
        return self.graph.attach(t)

    def where(self, ref: Ref) -> str:
        return self.graph.nodes[ref.id].where

    def run(self, registry: OpRegistry = REGISTRY, **limits: Any) -> dict[int, Any]:
        n = len(self.x)
        return execute(self.graph, self.model, lambda interp: self.model(self.x), [(0, n)], n,
                       RunConfig(RunLimits(**limits)), registry=registry)


def refused(build: Build, ref: Ref, spied: Spied | None = None, **limits: Any) -> ResourceLimitError:
    limits = {"op_bytes": MiB, "live_bytes": 64 * MiB, "seconds": 60} | limits
    with pytest.raises(ResourceLimitError) as info:
        build.run(registry=REGISTRY if spied is None else spied.registry, **limits)
    e = info.value
    assert e.where == build.where(ref), (e, build.graph)
    if spied is not None:
        assert build.graph.nodes[ref.id].op not in spied.calls, spied.calls  # never ran for real
    return e


# --- one op: sized before it runs ----------------------------------------------------------


def _ones(b: Build, *shape: int) -> TensorRef:
    return b.attach(torch.ones(*shape))


def _long_view(b: Build) -> TensorRef:  # 2**28 elements that take 4 bytes (a free view)
    return b.attach(torch.ones(1).expand(2**28))


def _big_requests() -> list[tuple[str, Callable[[Build], Ref]]]:
    """Ops that grow from small inputs to >= 8 GiB (each builds its graph, returns the node)."""
    n = 2**16
    add = Build.add
    return [
        ("zeros(size=...)", lambda b: add(b, "torch.zeros", size=(n, n // 2))),
        ("zeros(*sizes)", lambda b: add(b, "torch.zeros", n, n // 2)),
        ("ones(list)", lambda b: add(b, "torch.ones", [n, n])),
        ("full", lambda b: add(b, "torch.full", (n, n), 1.5)),
        ("eye", lambda b: add(b, "torch.eye", n)),
        ("arange float step", lambda b: add(b, "torch.arange", 0.0, 1.0, 1e-10)),
        ("linspace steps=", lambda b: add(b, "torch.linspace", 0, 1, steps=2**31)),
        ("zeros(0-dim tensor)", lambda b: add(b, "torch.zeros", b.attach(torch.tensor(2**33)))),
        ("outer", lambda b: add(b, "torch.outer", r := add(b, "Tensor.repeat", add(b, "Tensor.flatten", b.h),
                                                           n // 8), r)),
        ("kron", lambda b: add(b, "torch.kron", _ones(b, n), _ones(b, n))),
        ("matmul broadcast", lambda b: add(b, "torch.matmul", _ones(b, n, 1), _ones(b, 1, n))),
        ("operator.matmul", lambda b: add(b, "operator.matmul", _ones(b, n, 1), _ones(b, 1, n))),
        ("einsum", lambda b: add(b, "torch.einsum", "i,j->ij", _ones(b, n), _ones(b, n))),
        ("broadcast add", lambda b: add(b, "operator.add", _ones(b, n, 1), _ones(b, n))),
        ("one_hot(num_classes)", lambda b: add(b, "torch.nn.functional.one_hot",
                                               add(b, "Tensor.argmax", b.h, -1), num_classes=2**31)),
        ("expand (a view that grows)", lambda b: add(b, "Tensor.expand", add(b, "Tensor.sum", b.h), n, n)),
        ("repeat", lambda b: add(b, "Tensor.repeat", b.h, n, n)),
        ("tile", lambda b: add(b, "torch.tile", b.h, (n, n))),
        ("pad", lambda b: add(b, "torch.nn.functional.pad", b.h, (2**31, 2**31))),
        ("to(float64) of a view", lambda b: add(b, "Tensor.to", _long_view(b), torch.float64)),
        ("diag_embed", lambda b: add(b, "torch.diag_embed", _ones(b, n))),
        ("repeat_interleave(tensor)", lambda b: add(b, "torch.repeat_interleave", b.h,
                                                    b.attach(torch.tensor([2**31] * 8)))),
        ("one_hot (classes in the data)", lambda b: add(b, "torch.nn.functional.one_hot",
                                                        b.attach(torch.tensor([0, 2**31])))),
        ("tolist", lambda b: add(b, "Tensor.tolist", _long_view(b))),
        ("list(tensor): a view per row", lambda b: add(b, "builtins.list", _long_view(b))),
        ("unbind", lambda b: add(b, "Tensor.unbind", _long_view(b))),
        ("split(1)", lambda b: add(b, "torch.split", _long_view(b), 1)),
        ("[t] * n", lambda b: add(b, "operator.mul", [b.h], 2**28)),
    ]


@pytest.mark.parametrize("name,make", _big_requests(), ids=[n for n, _ in _big_requests()])
def test_a_big_op_is_refused_before_it_runs(name: str, make: Callable[[Build], Ref]) -> None:
    b = Build()
    ref = make(b)
    b.graph.nodes[ref.id].save = True
    e = refused(b, ref, Spied())
    assert "limit of 1,048,576 bytes" in e.message and f"`{b.graph.nodes[ref.id].op}`" in e.message


DTYPES = [torch.bool, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.float64,
          torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["zeros", "ones", "conversion"])
def test_bytes_are_counted_by_dtype(dtype: torch.dtype, op: str) -> None:
    """0.9x the limit in any dtype passes, 1.1x fails (a float32 is 4 bytes, not 8)."""
    size = torch.empty((), dtype=dtype).element_size()
    for fraction, ok in ((0.9, True), (1.1, False)):
        b = Build()
        n = int(fraction * MiB / size)
        if op == "conversion":  # from another dtype, so the op makes a copy
            source = torch.int8 if dtype != torch.int8 else torch.bool
            ref = b.add("Tensor.to", b.attach(torch.zeros(n, dtype=source)), dtype, save=True)
        else:
            ref = b.add(f"torch.{op}", n, dtype=dtype, save=True)
        if ok:
            assert b.run(op_bytes=MiB)[ref.id].dtype == dtype
        else:
            refused(b, ref)


@pytest.mark.parametrize("name,args,kwargs", [
    ("list(range)", ("builtins.list", range(10**8)), {}),
    ("tuple(range)", ("builtins.tuple", range(10**8)), {}),
    ("sum(range)", ("builtins.sum", range(10**12)), {}),
    ("max(range): walks it", ("builtins.max", range(10**12)), {}),
    ("str * n", ("operator.mul", "x", 10**9), {}),
    ("n * str", ("operator.mul", 10**9, "xy"), {}),
    ("list * n", ("operator.mul", [0, 1], 10**9), {}),
    ("tuple * n", ("operator.mul", (0,), 10**9), {}),
    ("pow of ints", ("operator.pow", 3, 10**8), {}),
    ("pow 2**65", ("operator.pow", 2, 65), {}),
    ("lshift", ("operator.lshift", 1, 10**6), {}),
    ("lshift 65 bits", ("operator.lshift", 1, 64), {}),
    ("mul of ints", ("operator.mul", 2**40, 2**40), {}),
    ("format width", ("operator.mod", "%01000000000d", 1), {}),
    ("sum of lists", ("builtins.sum", [[0] * 2000] * 2000, []), {}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_python_values_are_sized_from_their_arguments(name: str, args: tuple, kwargs: dict) -> None:
    b = Build()
    ref = b.add(*args, save=True, **kwargs)
    e = refused(b, ref, Spied())
    assert "limit" in e.message


def test_big_python_ints_are_refused_even_when_cheap() -> None:
    b = Build()
    big = b.add("builtins.int", b.add("Tensor.item", b.add("torch.full", (1,), 1e30)), save=True)
    e = refused(b, big)
    assert "64 bits" in e.message
    b = Build()
    total = b.add("builtins.sum", [2**63 - 1] * 3, save=True)
    assert "64 bits" in refused(b, total).message


@pytest.mark.parametrize("make,expected", [
    (lambda b: b.add("operator.pow", 3, 40, save=True), 3**40),
    (lambda b: b.add("operator.lshift", 1, 63, save=True), 1 << 63),
    (lambda b: b.add("operator.mul", "ab", 3, save=True), "ababab"),
    (lambda b: b.add("builtins.list", range(5), save=True), [0, 1, 2, 3, 4]),
    (lambda b: b.add("builtins.sum", [[1], [2]], [], save=True), [1, 2]),
    (lambda b: b.add("operator.mod", "%5.2f", 1.5, save=True), " 1.50"),
])
def test_small_python_values_still_work(make: Callable[[Build], Ref], expected: Any) -> None:
    b = Build()
    ref = make(b)
    assert b.run(op_bytes=MiB, live_bytes=MiB)[ref.id] == expected


# --- ops that work: same values as an unlimited run -----------------------------------------


def _ordinary() -> list[Callable[[Build], Ref]]:
    """A spread of ops a real experiment uses, including data-dependent ones."""
    return [
        lambda b: b.add("operator.getitem", b.h, (slice(None), -1), save=True),
        lambda b: b.add("Tensor.softmax", b.h, -1, save=True),
        lambda b: b.add("operator.add", b.h, b.attach(torch.ones(4)), save=True),
        lambda b: b.add("torch.matmul", b.h, b.add("Tensor.t", b.h), save=True),
        lambda b: b.add("torch.nonzero", b.add("operator.gt", b.h, 0), save=True),
        lambda b: b.add("operator.getitem", b.h, b.add("operator.gt", b.h, 0), save=True),
        lambda b: b.add("torch.masked_select", b.h, b.add("operator.gt", b.h, 0), save=True),
        lambda b: b.add("torch.unique", b.add("Tensor.argmax", b.h, -1), save=True),
        lambda b: b.add("torch.repeat_interleave", b.h, b.attach(torch.tensor([1, 3])), dim=0, save=True),
        lambda b: b.add("torch.nn.functional.one_hot", b.add("Tensor.argmax", b.h, -1), save=True),
        lambda b: b.add("Tensor.tolist", b.h, save=True),
        lambda b: b.add("Tensor.item", b.add("Tensor.sum", b.h), save=True),
        lambda b: b.add("builtins.list", b.h, save=True),
        lambda b: b.add("torch.zeros", b.attach(torch.tensor(3)), save=True),
        lambda b: b.add("Tensor.to", b.h, "cpu", torch.float64, save=True),
        lambda b: b.add("Tensor.cpu", b.h, save=True),
        lambda b: b.add("torch.einsum", "bi,bj->bij", b.h, b.h, save=True),
        lambda b: b.add("torch.topk", b.h, 2, save=True),
        lambda b: b.add("torch.allclose", b.h, b.h, save=True),
        lambda b: b.add("operator.setitem", b.add("Tensor.clone", b.h), b.add("operator.gt", b.h, 0), 0.0,
                        save=True),
    ]


@pytest.mark.parametrize("make", _ordinary())
def test_ordinary_ops_give_the_same_values_under_limits(make: Callable[[Build], Ref]) -> None:
    free, limited = Build(), Build()
    ref = make(free)
    make(limited)
    a, b = free.run()[ref.id], limited.run(op_bytes=MiB, live_bytes=8 * MiB, seconds=60)[ref.id]
    assert type(a) is type(b)
    if isinstance(a, tuple):
        a, b = list(a), list(b)
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    else:
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("shape", [(3,), (2, 5), (4, 1, 3)])
@pytest.mark.parametrize("make", [
    lambda x: ("torch.outer", (x.flatten(), x.flatten()), {}),
    lambda x: ("torch.kron", (x, x), {}),
    lambda x: ("torch.eye", (x.numel(),), {}),
    lambda x: ("torch.diag_embed", (x,), {}),
    lambda x: ("Tensor.repeat", (x, *([3] * x.dim())), {}),
    lambda x: ("torch.nn.functional.pad", (x, (2, 3)), {}),
    lambda x: ("torch.einsum", ("...,...->...", x, x), {}),
    lambda x: ("builtins.list", (x,), {}),
    lambda x: ("Tensor.tolist", (x,), {}),
    lambda x: ("torch.nn.functional.one_hot", (x.flatten().long() % 7, 7), {}),
    lambda x: ("torch.cat", ([x, x, x],), {}),
    lambda x: ("Tensor.to", (x, torch.complex128), {}),
])
def test_the_small_bound_holds(shape: tuple[int, ...], make: Callable[[torch.Tensor], tuple]) -> None:
    """The bound that lets tiny ops skip the meta run is never below what they make."""
    x = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    name, args, kwargs = make(x)
    out = REGISTRY[name](*args, **kwargs)
    bound = small_bound(args, kwargs)
    assert bound is not None and made_bytes(out, (args, kwargs)) <= bound


# --- one run: the bytes it holds ------------------------------------------------------------


def test_saves_count_against_live_bytes_before_they_are_taken() -> None:
    """40 saved 16 MiB site values against 250 MiB: the 16th save is refused."""
    b = Build(torch.randn(4096, 1024), width=1024)  # the output is 16 MiB of float32
    refs = [b.add("operator.getitem", b.h, slice(None), save=True) for _ in range(40)]
    e = refused(b, refs[15], op_bytes=GiB, live_bytes=250 * MiB)
    assert f"limit of {250 * MiB:,} bytes" in e.message
    b = Build(torch.randn(4096, 1024), width=1024)
    refs = [b.add("operator.getitem", b.h, slice(None), save=True) for _ in range(15)]
    assert len(b.run(op_bytes=GiB, live_bytes=250 * MiB)) == 15


@pytest.mark.parametrize("op,made", [("Tensor.clone", 4), ("torch.exp", 4), ("Tensor.double", 8),
                                     ("Tensor.half", 2), ("operator.mul", 4)])
def test_values_ops_make_count_against_live_bytes(op: str, made: int) -> None:
    """20 values of `made` MiB each against 40 MiB: refused at the one that crosses."""
    b = Build(torch.randn(1024, 1024), width=1024)  # the model's own 4 MiB: free
    extra = (2.0,) if op == "operator.mul" else ()
    refs = [b.add(op, b.h, *extra) for _ in range(20)]
    b.add("builtins.len", refs, save=True)
    e = refused(b, refs[_crossing(made)], op_bytes=GiB, live_bytes=40 * MiB)
    assert "this run would hold" in e.message and f"adds {made * MiB + TENSOR_OBJECT:,}" in e.message


def _crossing(made_mib: int) -> int:
    per = made_mib * MiB + TENSOR_OBJECT
    return (40 * MiB) // per  # values 0..k-1 fit, value k does not


def test_views_and_site_values_cost_nothing_unless_saved() -> None:
    b = Build(torch.randn(1024, 1024), width=1024)  # 4 MiB, the model's own
    last = b.h
    for _ in range(200):
        last = b.add("operator.getitem", b.h, slice(0, 512))
        last = b.add("Tensor.reshape", last, -1)
    b.add("builtins.len", last, save=True)
    b.run(op_bytes=8 * MiB, live_bytes=MiB)  # 400 views: their objects only
    b.graph.nodes[last.id].save = True
    e = refused(b, last, op_bytes=8 * MiB, live_bytes=MiB)  # saved, the view counts in full
    assert f"adds {512 * 1024 * 4:,}" in e.message


# --- time ------------------------------------------------------------------------------------


def test_the_deadline_holds_between_nodes_inside_one_hook() -> None:
    b = Build()
    m = b.add("Tensor.contiguous", b.add("Tensor.expand", b.add("Tensor.sum", b.h), 256, 256))
    chain = []
    for _ in range(3000):
        m = b.add("operator.truediv", b.add("operator.matmul", m, m), 256.0)
        chain.append(m)
    b.graph.nodes[m.id].save = True
    with pytest.raises(TimeLimitError) as info:
        b.run(seconds=0.2)
    where = info.value.where
    assert where.startswith(f"{THIS}:") and int(where.rpartition(":")[2]) < m.id  # stopped mid-chain


def test_an_unlimited_run_uses_the_plain_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a run without limits must not pay for them")

    monkeypatch.setattr(LimitedInterpreter, "__init__", boom)
    b = Build()
    ref = b.add("torch.zeros", 3, save=True)
    assert torch.equal(b.run()[ref.id], torch.zeros(3))
    assert not RunLimits(hide_weights=True).bounds_run() and RunLimits(seconds=1).bounds_run()
    assert issubclass(LimitedInterpreter, Interpreter)
    with pytest.raises(AssertionError, match="must not pay"):
        b.run(op_bytes=MiB)


def test_a_plain_argument_error_keeps_its_message() -> None:
    b = Build()
    ref = b.add("torch.matmul", b.h, b.h, save=True)
    with pytest.raises(ExecutionError, match="cannot be multiplied") as info:
        b.run(op_bytes=MiB, live_bytes=MiB, seconds=60)
    assert not isinstance(info.value, ResourceLimitError) and info.value.where == b.where(ref)


def test_an_op_with_no_meta_size_is_refused_not_run() -> None:
    spied = Spied()
    spied.registry.add("custom.peek", lambda t: t.numpy().sum())  # an admin's op, opaque to meta
    b = Build()
    ref = b.add("custom.peek", b.h, save=True)
    e = refused(b, ref, spied)
    assert "cannot be sized" in e.message


def test_operator_mul_on_strings_via_a_tensor_is_refused() -> None:
    b = Build()
    ref = b.add("operator.mod", "%01000000000d", b.add("Tensor.sum", b.h), save=True)
    refused(b, ref, Spied())
    assert operator.mod("%d", 1) == "1"
