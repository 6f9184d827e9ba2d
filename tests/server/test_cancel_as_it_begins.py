"""A cancel that lands as a job begins (after its row says RUNNING, before its worker has
it) still stops it (replica._begin): a job joining a generation session is dropped before
its first step, and a lone job never reaches its worker; the job stays CANCELLED with no
result, and the session's other job ends as it does alone.

The service runs in this process, not started, its replica a `ThreadWorker`
(tests/faults/live_service.py); the test cancels from inside the job store's `start`,
the exact moment between the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from faults.live_service import ThreadWorker, unstarted
from nnglass import LanguageModel
from nnglass.errors import NotFoundError
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.jobs import JobStatus
from nnglass.server.replica import Replica
from nnglass.server.service import Service
from service_fixtures import TINY, recording, small_graph


@dataclass
class Here:
    service: Service
    replica: Replica
    worker: ThreadWorker
    key_id: str
    lm: LanguageModel

    def submit(self, graph: Any) -> str:
        return self.service.submit(self.key_id, *wire.encode(graph)).id

    def cancel_as_it_begins(self, mp: pytest.MonkeyPatch, job_id: str) -> None:
        """Cancel `job_id` the moment its row says RUNNING."""
        jobs = self.service.jobs
        start = jobs.start

        def start_then_cancel(job: str, now: float) -> Any:
            out = start(job, now)
            if job == job_id:
                self.service.cancel(self.key_id, job)
            return out

        mp.setattr(jobs, "start", start_then_cancel)

    def assert_cancelled(self, job_id: str) -> None:
        assert self.service.get(self.key_id, job_id).status == JobStatus.CANCELLED
        with pytest.raises(NotFoundError):
            self.service.open_result(self.key_id, job_id)
        state = self.replica.state
        assert job_id not in state.running and job_id not in state.sharing and job_id not in state.dropping


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory, tiny_config: Any, tiny_dir: Path) -> Iterator[Here]:
    home = tmp_path_factory.mktemp("cancel-as-it-begins")
    with unstarted(home, tiny_config()) as (service, replica, worker):
        lm = LanguageModel(str(tiny_dir), name=TINY)
        yield Here(service, replica, worker, service.keys.create("alice")[0], lm)


def _generation(lm: LanguageModel, prompt: str, n: int) -> Any:
    with recording(lm.generate(prompt, max_new_tokens=n, min_new_tokens=n)) as tracer:
        tracer.result.save()
    return tracer.graph


def test_a_job_cancelled_as_it_joins_a_session_never_runs_a_step(here: Here,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    service = here.service
    first, joiner = (here.submit(_generation(here.lm, p, 6)) for p in ("the first", "a joiner"))
    here.cancel_as_it_begins(monkeypatch, joiner)
    admitted: list[str] = []
    stream = here.worker.stream

    def watched(requests: list[dict[str, Any]], on_step: Any, timeout: float, on_line: Any = None,
                beside: Any = None) -> None:
        def replied(message: dict[str, Any]) -> dict[str, Any]:
            reply = on_step(message)
            admitted.extend(r["job"] for r in reply["more"])
            return reply
        return stream(requests, replied, timeout, on_line, beside)

    monkeypatch.setattr(here.worker, "stream", watched)
    assert service.scheduler.next(TINY, timeout=5) == first
    here.replica.run_jobs([first])  # the session: the joiner is taken at its first step boundary

    assert joiner not in admitted  # before the fix: admitted, and generated all its tokens
    here.assert_cancelled(joiner)
    assert service.get(here.key_id, first).status == JobStatus.COMPLETED
    stream_, _ = service.open_result(here.key_id, first)
    with stream_:
        remote = decode_results(stream_.read())
    lone = here.lm.run_graph(_generation(here.lm, "the first", 6))
    assert list(remote) == list(lone)
    for name in lone:
        assert torch.equal(remote[name], lone[name])


def test_a_lone_job_cancelled_as_it_begins_never_reaches_its_worker(here: Here,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job = here.submit(small_graph(here.lm, "cancel me"))
    here.cancel_as_it_begins(monkeypatch, job)
    ran: list[dict[str, Any]] = []
    run = here.worker.run
    monkeypatch.setattr(here.worker, "run", lambda request, **kw: ran.append(request) or run(request, **kw))
    assert here.service.scheduler.next(TINY, timeout=5) == job
    here.replica.run_jobs([job])
    assert ran == []  # before the fix: it ran, and its answer was thrown away
    here.assert_cancelled(job)
