"""The model worker: a job run in the subprocess gives bitwise what the same graph gives
in-process; a failing job is an ERROR answer naming the user's line and the worker keeps
serving; a time limit stops the run (inside a hook, or by killing a child that never
reaches one); a crash is an ERROR answer and `restart()` brings the worker back; a result
over its byte limit is refused; the weights never change and never get a `.grad`.

The model is a tiny random Llama with a char-level tokenizer, saved to a temporary folder
(no hub), loaded by the worker and, as the reference, by a LanguageModel in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nnglass import LanguageModel, errors
from nnglass.errors import GraphError, NNglassError
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.server.worker import TEST_HANG, WorkerHandle, weights_checksum
from service_fixtures import recording, small_graph  # tests/service_fixtures.py, shared

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

NAME = "tiny"
HANG = "hang"  # the job id the test worker sleeps in, outside any hook
THIS = Path(__file__).name


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=NAME)


@pytest.fixture(scope="module")
def shared_worker(tiny_dir: Path) -> Iterator[WorkerHandle]:
    config = {"name": NAME, "source": str(tiny_dir), "dtype": "float32", "threads": torch.get_num_threads(),
              "debug_checksums": True}
    handle = WorkerHandle(config, env={TEST_HANG: HANG})
    handle.start(timeout=120)
    yield handle
    handle.kill()


@pytest.fixture
def worker(shared_worker: WorkerHandle) -> WorkerHandle:
    """The module's worker, alive (a test that killed it leaves it for the next to restart)."""
    if not shared_worker.alive:
        shared_worker.restart(timeout=120)
    return shared_worker


def submit(worker: WorkerHandle, graph: Graph, folder: Path, job: str = "j", *,
           run_seconds: float = 60.0, result_bytes: int = 2**30,
           timeout: float | None = None) -> tuple[dict[str, Any], Path]:
    """Write the graph as the server would, run it in the worker; (answer, result path)."""
    graph_json, tensor_bytes = wire.encode(graph)
    (folder / f"{job}.json").write_bytes(graph_json)
    tensors = None
    if tensor_bytes is not None:
        tensors = folder / f"{job}.tensors"
        tensors.write_bytes(tensor_bytes)
    result = folder / f"{job}.result"
    request = {"job": job, "graph": str(folder / f"{job}.json"),
               "tensors": None if tensors is None else str(tensors), "result": str(result),
               "limits": {"run_seconds": run_seconds, "result_bytes": result_bytes}}
    return worker.run(request, timeout=timeout), result


def assert_same(a: Any, b: Any) -> None:
    """Bitwise equal trees of saved values (tensors, lists, dicts, model outputs)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def assert_serves(worker: WorkerHandle, lm: LanguageModel, folder: Path) -> None:
    answer, result = submit(worker, small_graph(lm), folder, job="next")
    assert answer["status"] == "COMPLETED", answer
    assert result.stat().st_size == answer["bytes"]


# --- tests ----------------------------------------------------------------------------


def test_ready_reports_module_paths_and_weights(worker: WorkerHandle, lm: LanguageModel) -> None:
    assert worker.alive and worker.ready["pid"] == worker.pid
    assert worker.paths == [p for p, _ in lm.module.named_modules()]
    assert worker.ready["checksum"] == weights_checksum(lm.module)
    assert worker.ready["has_grad"] is False


@pytest.mark.parametrize("kind", ["trace", "generate", "session"])
def test_job_round_trip_is_bitwise(worker: WorkerHandle, lm: LanguageModel, tmp_path: Path,
                                   kind: str) -> None:
    if kind == "trace":
        with recording(lm.trace(["hello", "hi"])) as tracer:
            lm.model.layers[0].output.save()
            lm.model.layers[1].output[:, -1] = torch.linspace(-1, 1, 32)  # an attached tensor
            lm.output.save()  # a ModelOutput keeps its class
        graph = tracer.graph
    elif kind == "generate":
        with recording(lm.generate("abc", max_new_tokens=3)) as tracer:
            with tracer.all():
                lm.lm_head.output[:, -1].argmax(-1).save()
            tracer.result.save()
        graph = tracer.graph
    else:
        session = lm.session()
        with recording(session):
            with lm.trace("Paris"):
                h = lm.model.layers[0].output[:, -1]
            with lm.trace("Rome"):
                lm.model.layers[0].output[:, -1] = h
                lm.output.logits[:, -1].save()
        graph = Graph(model=NAME, mode="session", children=[t.graph for t in session.tracers])
    answer, result = submit(worker, graph, tmp_path)
    assert answer["status"] == "COMPLETED", answer
    data = result.read_bytes()
    assert answer["bytes"] == len(data)
    remote = decode_results(data)
    assert_same(remote, lm.run_graph(graph))
    assert remote and not list(tmp_path.glob(".*tmp*"))


def test_error_names_the_users_line_and_worker_keeps_serving(
    worker: WorkerHandle, lm: LanguageModel, tmp_path: Path
) -> None:
    pid = worker.pid
    with recording(lm.trace("hi")) as tracer:
        line = sys._getframe().f_lineno + 1
        lm.model.layers[0].output[0, 99].save()  # "hi" has 2 tokens
    answer, result = submit(worker, tracer.graph, tmp_path)
    assert answer["status"] == "ERROR" and answer["job"] == "j"
    assert answer["error"]["type"] == "ExecutionError"
    assert answer["error"]["where"].endswith(f"{THIS}:{line}")
    assert "index" in answer["error"]["message"]
    assert not result.exists()
    assert_serves(worker, lm, tmp_path)
    assert worker.pid == pid


def test_bad_requests_are_error_answers(worker: WorkerHandle, lm: LanguageModel, tmp_path: Path) -> None:
    pid = worker.pid
    other = LanguageModel(lm.module, tokenizer=lm.tokenizer, name="other")
    answer, _ = submit(worker, small_graph(other), tmp_path)
    assert answer["error"]["type"] == "GraphError" and "'other'" in answer["error"]["message"]
    (tmp_path / "broken.json").write_bytes(b'{"version": ')
    request = {"job": "b", "graph": str(tmp_path / "broken.json"), "tensors": None,
               "result": str(tmp_path / "b.result"),
               "limits": {"run_seconds": 5, "result_bytes": 1000}}
    answer = worker.run(request)
    assert answer["status"] == "ERROR" and issubclass(getattr(errors, answer["error"]["type"]), GraphError)
    answer = worker.run({**request, "graph": str(tmp_path / "missing.json")})
    assert answer["status"] == "ERROR" and answer["error"]["type"] == "FileNotFoundError"
    assert_serves(worker, lm, tmp_path)
    assert worker.pid == pid


def test_time_limit_stops_the_run_inside_a_hook(worker: WorkerHandle, lm: LanguageModel,
                                                tmp_path: Path) -> None:
    pid = worker.pid
    answer, result = submit(worker, small_graph(lm), tmp_path, run_seconds=0.0)
    assert answer["status"] == "ERROR" and answer["error"]["type"] == "TimeLimitError"
    assert not result.exists() and worker.alive and worker.pid == pid
    assert_serves(worker, lm, tmp_path)


def test_time_limit_kills_a_worker_that_never_reaches_a_hook(
    worker: WorkerHandle, lm: LanguageModel, tmp_path: Path
) -> None:
    pid = worker.pid
    start = time.monotonic()
    answer, result = submit(worker, small_graph(lm), tmp_path, job=HANG, run_seconds=0.5, timeout=1.5)
    assert time.monotonic() - start < 10
    assert answer["status"] == "ERROR" and answer["job"] == HANG
    assert answer["error"]["message"].startswith("time limit: the worker was stopped")
    assert not worker.alive and not result.exists()
    assert worker.run({"job": "late"})["error"]["message"].startswith("the worker is not running")
    worker.restart(timeout=120)
    assert worker.alive and worker.pid != pid
    assert_serves(worker, lm, tmp_path)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_crash_is_an_error_answer_and_restart_brings_it_back(
    worker: WorkerHandle, lm: LanguageModel, tmp_path: Path
) -> None:
    pid = worker.pid
    assert pid is not None
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))  # mid-job, as the OOM killer would
    killer.start()
    try:
        answer, _ = submit(worker, small_graph(lm), tmp_path, job=HANG, timeout=60)
    finally:
        killer.cancel()
    assert answer["status"] == "ERROR" and answer["job"] == HANG
    assert answer["error"]["message"] == f"the worker crashed (exit code {-signal.SIGKILL})"
    assert not worker.alive
    worker.restart(timeout=120)
    assert worker.alive and worker.pid != pid
    assert_serves(worker, lm, tmp_path)


def test_result_over_the_limit_is_refused(worker: WorkerHandle, lm: LanguageModel, tmp_path: Path) -> None:
    answer, result = submit(worker, small_graph(lm), tmp_path, result_bytes=100)
    assert answer["status"] == "ERROR" and answer["error"]["type"] == "PolicyError"
    assert "over this model's limit of 100 bytes" in answer["error"]["message"]
    assert not result.exists() and not list(tmp_path.glob(".*tmp*"))
    assert_serves(worker, lm, tmp_path)


def test_weights_unchanged_after_setters_and_backward(
    worker: WorkerHandle, lm: LanguageModel, tmp_path: Path
) -> None:
    with recording(lm.trace("gradients")) as tracer:
        h = lm.model.layers[0].output
        h.grad.save()
        lm.model.layers[1].output[:, 0] = 0
        lm.model.layers[1].mlp.down_proj.input = lm.model.layers[1].mlp.down_proj.input * 2
        lm.output.logits[0, -1].max().backward()
    answer, result = submit(worker, tracer.graph, tmp_path)
    assert answer["status"] == "COMPLETED", answer
    assert answer["checksum"] == worker.ready["checksum"] == weights_checksum(lm.module)
    assert answer["has_grad"] is False
    assert_same(decode_results(result.read_bytes()), lm.run_graph(tracer.graph))
    assert all(p.grad is None for p in lm.module.parameters())


def test_a_model_that_cannot_load_fails_start_clearly(tmp_path: Path) -> None:
    handle = WorkerHandle({"name": "nothing", "source": str(tmp_path), "dtype": "float32", "threads": 1})
    with pytest.raises(NNglassError, match=r"worker for model 'nothing' failed to start: .*Error"):
        handle.start(timeout=120)
    assert not handle.alive
