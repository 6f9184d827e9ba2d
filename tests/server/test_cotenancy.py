"""Co-tenancy: different users' forward-only graphs share one forward pass, each seeing only
its own rows and positions, with results equal to running alone (float tolerance; docs/reference.md, numbers).
One user's failure never fails the others: a shared run that fails runs each job alone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import nnglass
from nnglass import ExecutionError, LanguageModel, _config
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.merge import merge, share_key, split
from nnglass.graph.results import decode_results
from nnglass.server.worker import WorkerHandle
from service_fixtures import ON_BOTH_BACKENDS, recording

TINY = "tiny"  # the model name tests/server/conftest.py serves the tiny model under


def _record(lm: LanguageModel, body: Any) -> Graph:
    """The graph of `with lm.trace() as t: body(t)`, recorded without running it."""
    with recording(lm.trace()) as tracer:
        body(tracer)
    return tracer.graph


def _same(a: Any, b: Any) -> None:
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=TINY)


def three_users(lm: LanguageModel) -> list[Graph]:
    def alice(t: Any) -> None:
        with t.invoke("hello there"):
            lm.model.layers[0].output[:, -1] = 0
            lm.output.logits.save()

    def bob(t: Any) -> None:
        with t.invoke("hi"):
            lm.model.layers[1].output.save()
        with t.invoke("ciao amigo!"):
            lm.output.logits[:, -1].argmax(-1).save()
        with t.invoke():  # bob's whole batch: bob's rows only, never alice's
            lm.output.logits.sum().save()

    def carol(t: Any) -> None:
        with t.invoke(["good day!!!", "yo"]):
            lm.model.layers[0].mlp.down_proj.input[:, -1, :4] = 3.0
            lm.output.save()

    return [_record(lm, f) for f in (alice, bob, carol)]


def test_share_key_admits_forward_only_graphs_of_any_width(lm: LanguageModel) -> None:
    graphs = three_users(lm)
    assert len({share_key(g) for g in graphs}) == 1 and share_key(graphs[0]) is not None
    with_grad = _record(lm, lambda t: _grad_body(lm, t))
    longer = _record(lm, lambda t: _save_logits(lm, t, "a much longer prompt than the others"))
    assert share_key(with_grad) is None
    assert share_key(longer) == share_key(graphs[0])  # another width: each sees its own (window.py)


def _grad_body(lm: LanguageModel, t: Any) -> None:
    with t.invoke("hello there"):
        lm.model.layers[0].output.grad.save()
        lm.output.logits.sum().backward()


def _save_logits(lm: LanguageModel, t: Any, prompt: str) -> None:
    with t.invoke(prompt):
        lm.output.logits.save()


def test_merged_run_gives_each_graph_what_it_gets_alone(lm: LanguageModel) -> None:
    graphs = three_users(lm)
    alone = [lm.run_graph(g) for g in graphs]
    merged, offsets = merge(graphs)
    together = split(lm.run_graph(merged), graphs, offsets)
    for mine, shared in zip(alone, together):
        assert mine.keys() == shared.keys()
        for node_id in mine:
            _same(mine[node_id], shared[node_id])
    assert type(together[2][max(together[2])]) is type(alone[2][max(alone[2])])  # ModelOutput kept


def _job(tmp: Path, graph: Graph, i: int) -> dict[str, Any]:
    json_bytes, tensor_bytes = wire.encode(graph)
    (tmp / f"g{i}.json").write_bytes(json_bytes)
    if tensor_bytes:
        (tmp / f"t{i}.safetensors").write_bytes(tensor_bytes)
    return {"job": f"job{i}", "graph": str(tmp / f"g{i}.json"),
            "tensors": str(tmp / f"t{i}.safetensors") if tensor_bytes else None,
            "result": str(tmp / f"r{i}.safetensors"),
            "limits": {"run_seconds": 30, "result_bytes": 10**8}}


@pytest.fixture(scope="module")
def worker(tiny_dir: Path) -> Iterator[WorkerHandle]:
    handle = WorkerHandle({"name": TINY, "source": str(tiny_dir), "dtype": "float32",
                           "threads": torch.get_num_threads()})
    handle.start(timeout=120)
    yield handle
    handle.kill()


def test_worker_runs_a_batch_in_one_pass(worker: WorkerHandle, lm: LanguageModel, tmp_path: Path) -> None:
    graphs = three_users(lm)
    reply = worker.run({"batch": [_job(tmp_path, g, i) for i, g in enumerate(graphs)]}, timeout=60)
    answers = reply["batch"]
    assert [a["status"] for a in answers] == ["COMPLETED"] * 3
    assert all(a.get("shared") == 3 for a in answers)
    for i, g in enumerate(graphs):
        remote = decode_results((tmp_path / f"r{i}.safetensors").read_bytes())
        for node_id, value in lm.run_graph(g).items():
            _same(value, remote[node_id])


def test_one_failing_user_does_not_fail_the_others(worker: WorkerHandle, lm: LanguageModel,
                                                   tmp_path: Path) -> None:
    good = three_users(lm)[0]

    def bad_body(t: Any) -> None:
        with t.invoke("hello there"):
            lm.model.layers[0].output[:, 99].save()  # out of range: this user's error only

    bad = _record(lm, bad_body)
    reply = worker.run({"batch": [_job(tmp_path, good, 0), _job(tmp_path, bad, 1)]}, timeout=60)
    first, second = reply["batch"]
    assert first["status"] == "COMPLETED" and "shared" not in first  # ran alone after the failure
    assert second["status"] == "ERROR"
    assert second["error"]["where"].endswith(f"{Path(__file__).name}:{_line('[:, 99]')}")
    for node_id, value in lm.run_graph(good).items():
        _same(value, decode_results((tmp_path / "r0.safetensors").read_bytes())[node_id])


def test_a_job_failing_a_shared_pass_leaves_it_and_the_others_share_again(
        worker: WorkerHandle, lm: LanguageModel, tmp_path: Path) -> None:
    """Mixed widths: the failing job (the middle one) is found by its node and runs alone
    (its own error, its own line); the two others run shared again, as they are alone."""
    def bad_body(t: Any) -> None:
        with t.invoke("hey"):
            lm.model.layers[1].output[:, 50].save()  # past its own width: its error only

    good = [_record(lm, lambda t, p=p: _save_logits(lm, t, p)) for p in ("a rather long prompt", "hi")]
    graphs = [good[0], _record(lm, bad_body), good[1]]
    reply = worker.run({"batch": [_job(tmp_path, g, i) for i, g in enumerate(graphs)]}, timeout=60)
    answers = reply["batch"]
    assert [a["status"] for a in answers] == ["COMPLETED", "ERROR", "COMPLETED"]
    assert [a.get("shared") for a in answers] == [2, None, 2]
    assert answers[1]["error"]["where"].endswith(f"{Path(__file__).name}:{_line('[:, 50]')}")
    for i in (0, 2):
        remote = decode_results((tmp_path / f"r{i}.safetensors").read_bytes())
        for node_id, value in lm.run_graph(graphs[i]).items():
            _same(value, remote[node_id])


def _line(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text and "save()" in text)


@ON_BOTH_BACKENDS
def test_server_shares_a_forward_pass_between_queued_jobs(
    start_server: Any, tiny_config: Any, lm: LanguageModel, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "_overrides", {})  # configure() below is undone after the test
    server = start_server("cotenancy", tiny_config(), backend=backend)  # each combination (conftest)
    try:
        _, key = server.keys.create("alice")
        nnglass.configure(host=server.url, api_key=key)
        with lm.generate("hello", max_new_tokens=60, remote=True, blocking=False) as busy:
            lm.output.logits.save()  # keeps the only worker busy while the traces queue
        tracers = []
        for prompt in ["hello there", "goodbye you", "how are you"]:  # one padded width
            with lm.trace(prompt, remote=True, blocking=False) as tracer:
                out = lm.model.layers[1].output.save()
            tracers.append((tracer, out, prompt))
        busy.job.wait(timeout=60)
        for tracer, out, prompt in tracers:
            tracer.job.wait(timeout=60)
            with lm.trace(prompt):
                local = lm.model.layers[1].output.save()
            _same(out.value, local.value)
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        shared = re.search(r"nnglass_shared_jobs_total (\d+)", metrics)
        assert shared is not None and int(shared.group(1)) >= 2, metrics
        with pytest.raises(ExecutionError), lm.trace("hello there", remote=True):
            lm.model.layers[0].output[:, 99].save()
    finally:
        server.stop()
