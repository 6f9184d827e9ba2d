"""A sharded model behind the worker protocol: co-tenant jobs share one pass on a rank
group, and a server whose model says `shards = 2` serves remote jobs from one; both give
what the unsharded model gives (1e-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nnglass
from nnglass import _config
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.config import ModelConfig, ServerConfig
from nnglass.server.engines import subprocess_worker
from service_fixtures import recording

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _graphs(lm: Any) -> list[Any]:
    graphs = []
    for prompt, edit in (("hello there", 0.0), ("hi", 2.0), ("good day!!!", -1.0)):
        with recording(lm.trace(prompt)) as tracer:
            lm.model.layers[0].mlp.down_proj.input[:, -1, :8] = edit
            lm.model.layers[1].self_attn.q_proj.output.save()
            lm.output.logits.save()
        graphs.append(tracer.graph)
    return graphs


def _job(tmp: Path, graph: Any, i: int) -> dict[str, Any]:
    data, tensors = wire.encode(graph)
    (tmp / f"g{i}.json").write_bytes(data)
    if tensors:
        (tmp / f"t{i}.safetensors").write_bytes(tensors)
    return {"job": f"job{i}", "graph": str(tmp / f"g{i}.json"),
            "tensors": str(tmp / f"t{i}.safetensors") if tensors else None,
            "result": str(tmp / f"r{i}.safetensors"), "limits": {"run_seconds": 60}}


def test_co_tenant_jobs_share_a_pass_on_the_rank_group(tiny_pair: Any, tmp_path: Path) -> None:
    graphs = _graphs(tiny_pair.alone)
    handle = tiny_pair.sharded._rank_group().handle  # rank 0: a worker (server/worker.py)
    request = {"batch": [_job(tmp_path, g, i) for i, g in enumerate(graphs)]}
    answers = handle.run(request, timeout=120)["batch"]
    assert [a["status"] for a in answers] == ["COMPLETED"] * 3
    assert all(a.get("shared") == 3 for a in answers)
    for i, graph in enumerate(graphs):
        remote = decode_results((tmp_path / f"r{i}.safetensors").read_bytes())
        for node_id, value in tiny_pair.alone.run_graph(graph).items():
            torch.testing.assert_close(getattr(remote[node_id], "logits", remote[node_id]),
                                       getattr(value, "logits", value), **TOL)


def test_the_subprocess_engine_passes_shards_to_the_worker() -> None:
    worker = subprocess_worker(ModelConfig(name="m", source="s", shards=3), ServerConfig())
    assert worker.config["shards"] == 3


def test_a_server_serves_remote_jobs_from_a_sharded_model(start_server: Any, tiny_config: Any,
                                                          tiny_alone: Any) -> None:
    text = tiny_config().replace("threads =", "shards = 2\nthreads =", 1)
    server = start_server("sharded", text)
    try:
        _, key = server.keys.create("alice")
        lm = tiny_alone
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_config, "_overrides", {})
            nnglass.configure(host=server.url, api_key=key)
            with lm.trace("Hello world", remote=True):
                lm.model.layers[0].mlp.down_proj.input[:, -1] = 3.0
                q = lm.model.layers[1].self_attn.q_proj.output.save()
                logits = lm.output.logits.save()
        with lm.trace("Hello world"):
            lm.model.layers[0].mlp.down_proj.input[:, -1] = 3.0
            q_ref = lm.model.layers[1].self_attn.q_proj.output.save()
            logits_ref = lm.output.logits.save()
        torch.testing.assert_close(q.value, q_ref.value, **TOL)
        torch.testing.assert_close(logits.value, logits_ref.value, **TOL)
    finally:
        server.stop()
