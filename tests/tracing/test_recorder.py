"""`nnglass.Recorder`: the supported way to record a graph without running it. The graph
it keeps is the one a run would execute: running it gives the values a local trace saves."""

from __future__ import annotations

import pytest
import torch

import nnglass
from nnglass.graph import wire


def test_recorded_graph_runs_to_the_local_trace_values(mlp: torch.nn.Module) -> None:
    x = torch.randn(3, 8)
    rec = nnglass.Recorder()
    net = nnglass.NNModel(mlp, backend=rec)
    with net.trace(x, remote=True) as tracer:
        h = net.layers[0].output.save()
    assert tracer.job.status() == "RECORDED" and rec.last is tracer.graph
    with pytest.raises(nnglass.NNglassError):
        tracer.job.result()
    with pytest.raises(nnglass.NNglassError):
        _ = h.value  # never ran: no value, a clear error
    with net.trace(x):
        local = net.layers[0].output.save()
    node_id = next(n for _, n in tracer.saved.values())
    for graph in (rec.last, wire.roundtrip(rec.last)):
        assert torch.equal(net.run_graph(graph)[node_id], local.value)


def test_sessions_and_several_traces_are_kept_in_order(mlp: torch.nn.Module) -> None:
    x = torch.randn(2, 8)
    rec = nnglass.Recorder()
    net = nnglass.NNModel(mlp, backend=rec)
    with net.trace(x, remote=True):
        net.head.output.save()
    with net.session(remote=True) as session:
        with net.trace(x):
            h = net.layers[0].output
        with net.trace(x):
            net.layers[0].output = h
    assert [g.mode for g in rec.graphs] == ["trace", "session"]
    assert rec.graphs[1] is session.graph and len(session.graph.children) == 2


def test_an_empty_recorder_says_how_to_use_it() -> None:
    with pytest.raises(nnglass.NNglassError, match="backend=this recorder"):
        _ = nnglass.Recorder().last
