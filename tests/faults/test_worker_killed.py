"""kill -9 the worker from outside (the out-of-memory killer, an operator) mid-job and
mid-shared-pass. The documented outcomes (docs/security.md, "Reliability"):

- mid-job, the job alone in its pass: it ends ERROR with the reason ("the worker crashed
  (exit code -9)": the server cannot tell this from the job killing the worker itself,
  so it does not run it again), and the next job runs on the restarted worker;
- mid-shared-pass: which job did it is unknown, so each job of the pass runs once more
  alone on a restarted worker and completes as it would have alone (attempt 2); a job
  queued behind the pass is untouched (attempt 1). Nothing stays RUNNING.

A job is held in the worker by its test hook (NNGLASS_WORKER_TEST_HANG names it). Its id
is known only once it is submitted, so each is queued behind work that keeps the worker
busy until the hook names it: the lone job behind a slow job, the pass's jobs behind the
held lone job (the worker restarted after its kill takes them as one pass). The hook is
cleared before the last kill, so what runs again runs normally.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fault_kit import until

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.server.jobs import SQLiteJobStore
from nnglass.server.worker import TEST_HANG
from service_fixtures import (
    PROMPTS,
    TERMINAL,
    assert_as_alone,
    record,
    recording,
    slow_graph,
    submit,
    wait_for,
)


def lone(lm: LanguageModel, prompt: str) -> Graph:
    """A job that never shares a pass (validated first), so it runs alone. Not a generate
    job: a generation session runs the traces queued behind it beside its batch
    (server/beside.py) at once, and here they must wait behind it."""
    with recording(lm.trace(prompt, validate=True)) as tracer:
        lm.lm_head.output[:, -1].argmax(-1).save()
    return tracer.graph


@dataclass
class Scene:
    server: Any  # service_fixtures.Server
    key: str
    graphs: dict[str, Graph]
    alone: str  # killed mid-job, alone
    after_alone: str  # queued behind it
    shared: list[str]  # killed mid-shared-pass
    after_pass: str  # queued behind the pass
    metrics: dict[str, float]  # at the start

    def metric(self, name: str) -> float:
        return float(self.server.metric(self.key, f"nnglass_{name}"))


@pytest.fixture(scope="module")
def scene(start_server: Callable[..., Any], tiny_config: Callable[..., str],
          tmp_path_factory: pytest.TempPathFactory, lm: LanguageModel) -> Iterator[Scene]:
    hang = tmp_path_factory.mktemp("worker-killed-hooks") / "hang"
    hang.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_HANG, str(hang))
        server = start_server("worker-killed", tiny_config(run_seconds=20))
    key = server.keys.create("alice")[1]
    scene = Scene(server, key, {}, "", "", [], "", {})
    scene.metrics = {m: scene.metric(m) for m in ("worker_restarts_total", "shared_passes_lost_total")}

    def add(http: Any, graph: Graph) -> str:
        job = submit(http, graph)
        scene.graphs[job] = graph
        return job

    def kill_worker() -> None:
        restarts = scene.metric("worker_restarts_total")
        os.kill(server.worker_pid("tiny"), signal.SIGKILL)
        until(lambda: scene.metric("worker_restarts_total") > restarts, "the server to restart its worker")

    with server.client(key) as http:
        add(http, slow_graph(lm, 1500, 4))  # busy while the lone job is named
        scene.alone = add(http, lone(lm, PROMPTS[0]))
        hang.write_text(scene.alone)
        assert wait_for(http, scene.alone, ("RUNNING", *TERMINAL))["status"] == "RUNNING"
        scene.after_alone = add(http, lone(lm, PROMPTS[1]))
        scene.shared = [add(http, record(lm, prompt)) for prompt in PROMPTS[1:]]
        scene.after_pass = add(http, lone(lm, PROMPTS[2]))
        hang.write_text("\n".join(scene.shared))
        kill_worker()  # mid-job: the lone job's worker
        for job in scene.shared:  # the restarted worker holds them, in one pass
            assert wait_for(http, job, ("RUNNING", *TERMINAL))["status"] == "RUNNING"
        hang.write_text("")
        kill_worker()  # mid-shared-pass
        for job in scene.graphs:
            wait_for(http, job)
    yield scene
    server.stop()


def attempts(scene: Scene, job: str) -> int:
    with SQLiteJobStore(scene.server.home / "nnglass.db") as store:
        found = store.get(job)
    assert found is not None
    return found.attempts


def test_a_job_whose_worker_is_killed_ends_error_with_the_reason(scene: Scene, lm: LanguageModel) -> None:
    with scene.server.client(scene.key) as http:
        info = wait_for(http, scene.alone)
        assert info["status"] == "ERROR", info
        assert info["error"]["message"] == "the worker crashed (exit code -9)", info
        assert_as_alone(http, scene.after_alone, lm, scene.graphs[scene.after_alone])
    assert attempts(scene, scene.alone) == 1  # not run again: it may be what killed the worker


def test_a_killed_shared_pass_runs_each_job_again_alone(scene: Scene, lm: LanguageModel) -> None:
    with scene.server.client(scene.key) as http:
        for job in scene.shared:
            assert_as_alone(http, job, lm, scene.graphs[job])
            assert attempts(scene, job) == 2  # the pass, then alone
        assert_as_alone(http, scene.after_pass, lm, scene.graphs[scene.after_pass])
    assert attempts(scene, scene.after_pass) == 1  # behind the pass: untouched
    lost = scene.metric("shared_passes_lost_total") - scene.metrics["shared_passes_lost_total"]
    assert lost == 1  # they really were one pass
    restarts = scene.metric("worker_restarts_total") - scene.metrics["worker_restarts_total"]
    assert restarts == 2  # the two kills; the reruns ran on the worker restarted after the last
    with SQLiteJobStore(scene.server.home / "nnglass.db") as store:
        assert store.unfinished() == []
