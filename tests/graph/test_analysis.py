"""`graph.analysis`: what each value shares memory with and what each op edits, read by
both the runtime's plan and the server's policy — so they agree by construction."""

from __future__ import annotations

from collections.abc import Callable

import torch

import nnglass
from nnglass.graph.analysis import analyze
from nnglass.graph.ir import Graph
from nnglass.graph.ops import REGISTRY
from nnglass.runtime.plan import build_plan
from nnglass.server.config import Policy
from nnglass.server.policy import check_policy


def record(mlp: torch.nn.Module, body: Callable[[nnglass.NNModel], object]) -> Graph:
    rec = nnglass.Recorder()
    net = nnglass.NNModel(mlp, backend=rec)
    with net.trace(torch.randn(2, 8), remote=True):
        body(net)
    return rec.last


def test_views_conversions_and_containers_share_their_arguments_roots(mlp: torch.nn.Module) -> None:
    def body(net):
        h = net.layers[0].output            # 0: get
        v = h[:, :2]                         # 1: a view
        c = h.cpu()                          # 2: may return h itself
        w = net.head.weight                  # 3: param
        fresh = h * 2                        # 4: new memory
        pair = torch.stack([v, fresh])       # 5: new memory (stack copies)
        _ = (w, pair, c)

    graph = record(mlp, body)
    memory = analyze(graph)
    get = next(n.id for n in graph.nodes if n.op == "get")
    by_op = {n.op: n.id for n in graph.nodes}
    assert memory.roots[by_op["operator.getitem"]] >= {get}
    assert memory.roots[by_op["Tensor.cpu"]] >= {get}
    assert memory.roots[by_op["operator.mul"]] == {by_op["operator.mul"]}
    assert memory.roots[by_op["torch.stack"]] == {by_op["torch.stack"]}
    assert memory.shares_weights(by_op["param"]) and not memory.shares_weights(by_op["operator.mul"])
    assert not any(memory.edits.values())


def test_an_inplace_edit_through_a_conversion_is_a_write_for_plan_and_policy(mlp: torch.nn.Module) -> None:
    graph = record(mlp, lambda net: net.layers[0].output.cpu().add_(1))
    memory = analyze(graph)
    edit = next(n for n in graph.nodes if n.op == "Tensor.add_")
    get = next(n for n in graph.nodes if n.op == "get")
    assert get.id in memory.edits[edit.id]  # (and the conversion's own value, which may be it)
    plan = build_plan(graph, REGISTRY)
    assert plan.tasks[get.site].copy and edit.id in plan.tasks[get.site].inplace
    read_only = Policy(read=["**"], write=[])
    try:
        check_policy(graph, read_only, {p for p, _ in mlp.named_modules()})
    except nnglass.PolicyError as e:
        assert "writing `layers.0.output`" in e.message
    else:
        raise AssertionError("the policy let an in-place write through")


def test_grad_targets_walk_int_indexing_only(mlp: torch.nn.Module) -> None:
    def body(net):
        net.layers[0].output.grad.save()
        net.output.sum().backward()

    graph = record(mlp, body)
    memory = analyze(graph)
    grad = next(n for n in graph.nodes if n.op == "grad")
    get = next(n for n in graph.nodes if n.op == "get")
    assert memory.grad_targets[grad.id] == (get.id, ())
