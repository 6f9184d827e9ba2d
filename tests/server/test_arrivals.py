"""Jobs sent together run together: a pass that is due while submissions are being taken in
waits for them (server/arrivals.py), within its bound, and not for one open longer than
that; the route opens and closes each submission whatever its outcome."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from faults.live_service import live
from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.arrivals import Arrivals, closing
from nnglass.server.jobs import JobStatus
from service_fixtures import TINY, recording


def test_settle_waits_for_the_submissions_open_when_called() -> None:
    arrivals = Arrivals()
    assert arrivals.settle(5.0) == 0  # nothing open: no wait
    first, closed = arrivals.open(), threading.Event()

    def close_later() -> None:
        time.sleep(0.05)
        closed.set()
        first()

    threading.Thread(target=close_later).start()
    assert arrivals.settle(5.0) == 1
    assert closed.is_set() and arrivals.pending == 0
    first()  # closing twice changes nothing
    assert arrivals.pending == 0


def test_settle_waits_for_submissions_that_open_meanwhile() -> None:
    arrivals = Arrivals()
    first, closed = arrivals.open(), threading.Event()

    def open_another_then_close_both() -> None:
        time.sleep(0.05)
        later = arrivals.open()  # after the settle began (clients sent at once arrive apart)
        first()
        time.sleep(0.05)
        closed.set()
        later()

    threading.Thread(target=open_another_then_close_both).start()
    assert arrivals.settle(5.0) == 2
    assert closed.is_set() and arrivals.pending == 0


def test_settle_is_bounded_and_ignores_a_submission_older_than_its_bound() -> None:
    arrivals = Arrivals()
    stuck = arrivals.open()  # never closes while the test runs (a client uploading slowly)
    began = time.monotonic()
    assert arrivals.settle(0.05) == 1
    assert time.monotonic() - began >= 0.05
    assert arrivals.settle(0.05) == 0  # open longer than the bound: not waited for again
    stuck()


def test_closing_closes_in_the_submitting_thread_whether_the_call_returns_or_raises() -> None:
    arrivals = Arrivals()
    seen: list[int] = []

    def submit(value: int) -> int:
        seen.append(arrivals.pending)  # open while the call runs
        if value < 0:
            raise ValueError("refused")
        return value

    assert closing(arrivals.open(), submit)(3) == 3 and arrivals.pending == 0
    with pytest.raises(ValueError):
        closing(arrivals.open(), submit)(-1)
    assert arrivals.pending == 0 and seen == [1, 1]


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=TINY)


def _graph(lm: LanguageModel, prompt: str) -> Any:
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output[:, 1] = 0  # a position from the left, in the job's own width
        lm.output.logits[:, -1].save()
    return tracer.graph


def test_a_pass_due_during_submissions_takes_them_and_every_submission_closes(
        tmp_path: Path, tiny_config: Any, lm: LanguageModel) -> None:
    config = tiny_config().replace("[models.policy.limits]", "share_settle_s = 5\n[models.policy.limits]")
    with live(tmp_path, config) as here:
        service = here.service
        key_id = service.keys.verify(here.key)
        graphs = [_graph(lm, "hello there"), _graph(lm, "a longer prompt here")]
        taking_in = service.arrivals.open()  # a submission the server is still taking in
        first = service.submit(key_id, *wire.encode(graphs[0]))
        deadline = time.monotonic() + 30
        while service.scheduler.depth(TINY) and time.monotonic() < deadline:
            time.sleep(0.01)  # the replica took the first job: its pass is due, and waits
        second = service.submit(key_id, *wire.encode(graphs[1]))
        taking_in()
        for job in (first, second):
            while not service.jobs.get(job.id).status.terminal and time.monotonic() < deadline:
                time.sleep(0.01)
            assert service.jobs.get(job.id).status == JobStatus.COMPLETED
        state = service.models[TINY]
        assert state.last_pass == 2 and state.passes.jobs.n == 1  # both in the one pass
        for job, graph in zip((first, second), graphs):
            stream, _ = service.open_result(key_id, job.id)
            with stream:
                got = decode_results(stream.read())
            alone = lm.run_graph(graph)  # the lone local run
            assert got.keys() == alone.keys()
            for node, value in alone.items():
                torch.testing.assert_close(got[node], value, atol=1e-4, rtol=1e-4)
        opened: list[int] = []
        arrivals_open = service.arrivals.open
        service.arrivals.open = lambda: opened.append(1) or arrivals_open()  # type: ignore[method-assign]
        with here.client() as http:  # refused submissions close too; anonymous ones never open
            assert httpx.post(f"{here.url}/v1/jobs", content=b"").status_code == 401
            assert opened == []
            broken = {"graph": ("g.json", b"{", "application/json")}
            assert http.post("/v1/jobs", files=broken).status_code == 400
            assert opened == [1]
        assert service.arrivals.pending == 0
