"""The wall clock stepping back (NTP, an operator) is harmless: a job that spans the step,
and one that runs during it, keep their timestamps in order (no negative wait or run
time on the API or the dashboard), their expiry is not reached early once the clock is
corrected forward, and the queue goes on (it waits by `time.monotonic`, which no step
moves). The step is made in the service's own clock source (server/clock.py), on an
in-process live server (tests/faults/live_service.py). Leases between frontends use the
database's clock (pg_queue.py): a frontend's clock never reaches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from live_service import Live, live

from nnglass import LanguageModel
from nnglass.server import clock
from service_fixtures import PROMPTS, assert_as_alone, record, submit, wait_for

TTL = 60.0
STEP = 3600.0  # the clock goes back an hour


@pytest.fixture(scope="module")
def site(tiny_config: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    text = tiny_config().replace("result_ttl_s = 3600", f"result_ttl_s = {TTL}")
    assert f"result_ttl_s = {TTL}" in text
    with live(tmp_path_factory.mktemp("clock"), text) as server:
        yield server


def in_order(info: dict) -> None:
    stamps = [info[k] for k in ("created_at", "queued_at", "started_at", "finished_at")]
    assert stamps == sorted(stamps), info  # no negative wait or run time
    assert info["expires_at"] == info["finished_at"] + TTL, info


def test_a_clock_stepping_back_is_harmless(site: Live, lm: LanguageModel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    offset = 0.0
    monkeypatch.setattr(clock, "wall", lambda: time.time() - offset)
    graphs = {}
    with site.client() as http:
        site.gate.clear()
        try:
            spans = submit(http, graph := record(lm))
            graphs[spans] = graph
            assert wait_for(http, spans, ("RUNNING",))["status"] == "RUNNING"
            offset = STEP  # mid-run: the clock goes back an hour
            during = submit(http, graph := record(lm, PROMPTS[1]))
            graphs[during] = graph
        finally:
            site.gate.set()
        for job, graph in graphs.items():
            assert_as_alone(http, job, lm, graph)  # the queue went on
            in_order(wait_for(http, job))
        offset = 0.0  # corrected forward
        site.service.expire(clock.now())  # an expiry round right after
        for job, graph in graphs.items():
            assert_as_alone(http, job, lm, graph)  # still there: not expired early
        after = submit(http, graph := record(lm, PROMPTS[2]))
        assert_as_alone(http, after, lm, graph)
        in_order(wait_for(http, after))
