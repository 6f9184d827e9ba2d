"""Run limits in the model worker: a CPU bomb (a huge integer power, a long chain of
matmuls in one hook) or a memory bomb ends its job as an ERROR at the user's line, soon,
and the same worker process serves the next job (the kill at run_seconds + grace is a
backstop that these never reach: the pid stays the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph, Ref
from nnglass.server.worker import WorkerHandle
from service_fixtures import recording  # tests/service_fixtures.py, shared

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

NAME = "tiny"
THIS = Path(__file__).name
MiB = 2**20


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=NAME)


@pytest.fixture(scope="module")
def worker(tiny_dir: Path) -> Iterator[WorkerHandle]:
    handle = WorkerHandle({"name": NAME, "source": str(tiny_dir), "dtype": "float32", "threads": 1})
    handle.start(timeout=120)
    yield handle
    handle.kill()


def graph_with(lm: LanguageModel, build: Any) -> Graph:
    """A trace of "hi" reading layer 0's output (node 0), then `build(graph, h)`'s nodes."""
    with recording(lm.trace("hi")) as tracer:
        lm.model.layers[0].output.sum().save()
    graph = tracer.graph
    h = Ref(next(n.id for n in graph.nodes if n.op == "get"))
    build(graph, h)
    graph.plan_key = None
    return graph


def submit(worker: WorkerHandle, graph: Graph, folder: Path, job: str, **limits: Any) -> dict[str, Any]:
    graph_json, tensor_bytes = wire.encode(graph)
    (folder / f"{job}.json").write_bytes(graph_json)
    tensors = None
    if tensor_bytes is not None:
        tensors = folder / f"{job}.tensors"
        tensors.write_bytes(tensor_bytes)
    table = {"run_seconds": 60.0, "result_bytes": 2**30, "op_bytes": 64 * MiB, "live_bytes": 256 * MiB}
    table |= limits
    request = {"job": job, "graph": str(folder / f"{job}.json"),
               "tensors": None if tensors is None else str(tensors), "result": str(folder / f"{job}.result"),
               "limits": table}
    return worker.run(request, timeout=table["run_seconds"] + 30)


def _pow(graph: Graph, h: Ref) -> None:
    graph.add("operator.pow", (3, 10**8), save=True, where=f"{THIS}:bomb")


def _lshift(graph: Graph, h: Ref) -> None:
    graph.add("operator.lshift", (1, 10**9), save=True, where=f"{THIS}:bomb")


def _matmuls(graph: Graph, h: Ref) -> None:
    s = graph.add("Tensor.sum", (h,), where=f"{THIS}:setup")
    m = graph.add("Tensor.expand", (Ref(s.id), 512, 512), where=f"{THIS}:setup")
    m = graph.add("Tensor.contiguous", (Ref(m.id),), where=f"{THIS}:setup")
    for _ in range(5000):
        p = graph.add("operator.matmul", (Ref(m.id), Ref(m.id)), where=f"{THIS}:bomb")
        m = graph.add("operator.truediv", (Ref(p.id), 512.0), where=f"{THIS}:bomb")
    graph.nodes[m.id].save = True


def _saves(graph: Graph, h: Ref) -> None:
    big = graph.add("torch.zeros", (4 * MiB,), where=f"{THIS}:setup")  # 16 MiB of float32
    for k in range(40):
        graph.add("operator.add", (Ref(big.id), float(k)), save=True, where=f"{THIS}:bomb")


def _zeros(graph: Graph, h: Ref) -> None:
    graph.add("torch.zeros", (), {"size": (2**20, 2**20)}, save=True, where=f"{THIS}:bomb")


@pytest.mark.parametrize("build,error,limits", [
    (_pow, "ResourceLimitError", {}),
    (_lshift, "ResourceLimitError", {}),
    (_matmuls, "TimeLimitError", {"run_seconds": 1.0, "live_bytes": 2**40}),
    (_saves, "ResourceLimitError", {}),
    (_zeros, "ResourceLimitError", {}),
], ids=["pow", "lshift", "matmul-chain", "saves", "zeros(size=)"])
def test_a_bomb_ends_its_job_and_the_worker_lives_on(
    worker: WorkerHandle, lm: LanguageModel, tmp_path: Path, build: Any, error: str, limits: dict
) -> None:
    pid = worker.pid
    answer = submit(worker, graph_with(lm, build), tmp_path, "bomb", **limits)
    assert answer["status"] == "ERROR" and answer["error"]["type"] == error, answer
    assert answer["error"]["where"] == f"{THIS}:bomb"
    assert "limit" in answer["error"]["message"]
    assert not (tmp_path / "bomb.result").exists()
    after = submit(worker, graph_with(lm, lambda g, h: None), tmp_path, "next")
    assert after["status"] == "COMPLETED", after
    assert worker.alive and worker.pid == pid  # never killed: the limits stopped it
