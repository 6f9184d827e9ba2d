"""Clients that go away mid-stream, and a result that expires while it downloads:

- a client that drops an event stream (SSE) or a result download halfway leaves nothing
  behind in the server: no listener of the event hub, no open result file, no socket;
  the jobs it watched still run to the end;
- a result whose time is up while it downloads: the download already under way completes
  whole (the open file outlives its name), one that starts after is a 404, and the job's
  record stays COMPLETED (its result gone). Never a torn file served as whole: a body
  cut short is shorter than its Content-Length, which the client refuses
  (tests/faults/test_server_killed.py).

On an in-process live server (tests/faults/live_service.py): its hub and this process's
file descriptors are what the test inspects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_kit import big, open_files, until
from live_service import Live, live

from nnglass import LanguageModel
from nnglass.graph.results import decode_results
from nnglass.server.results import RESULT_FILE
from saved_values import assert_bitwise_equal
from service_fixtures import PROMPTS, assert_as_alone, record, submit, wait_for

ROUNDS = 5  # each drops two event streams and a download


@pytest.fixture(scope="module")
def site(tiny_config: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live(tmp_path_factory.mktemp("streams"), tiny_config()) as server:
        yield server


def listeners(site: Live) -> int:
    """Event streams the hub still wakes (EventHub's own table: there is no other view)."""
    return sum(len(w) for w in site.service.hub._waiters.values())  # type: ignore[attr-defined]


def results_open() -> list[str]:
    return [f for f in open_files(os.getpid()) if f.endswith(RESULT_FILE)]


def test_clients_that_leave_mid_stream_leave_nothing_behind(site: Live, lm: LanguageModel) -> None:
    with site.client() as http:
        done = submit(http, big(lm, 8))  # 8 MiB: a download is far from over after one chunk
        assert wait_for(http, done)["status"] == "COMPLETED"
        sockets = len(open_files(os.getpid()))  # this client's connection included
        site.gate.clear()
        try:
            held = submit(http, graph_held := record(lm))
            assert wait_for(http, held, ("RUNNING",))["status"] == "RUNNING"
            queued = submit(http, graph_queued := record(lm, PROMPTS[1]))
            for _ in range(ROUNDS):
                for job in (held, queued):
                    with site.client() as other, other.stream("GET", f"/v1/jobs/{job}/events") as events:
                        first = next(events.iter_lines())
                        assert first.startswith("data: ") and '"status": "COMPLETED"' not in first, first
                with site.client() as other, other.stream("GET", f"/v1/jobs/{done}/result") as body:
                    assert len(next(body.iter_raw(1 << 16))) > 0  # then the client goes
            until(lambda: listeners(site) == 0, "every dropped event stream to stop listening")
            until(lambda: results_open() == [], "every dropped download to close its file")
            until(lambda: len(open_files(os.getpid())) <= sockets, "the dropped connections to close")
        finally:
            site.gate.set()
        assert_as_alone(http, held, lm, graph_held)  # what they watched went on
        assert_as_alone(http, queued, lm, graph_queued)


def test_a_result_that_expires_mid_download_downloads_whole(site: Live, lm: LanguageModel) -> None:
    graph = big(lm, 16)  # more than loopback buffers hold: most of it is read after the expiry
    folder = Path(site.service.config.home) / "jobs"
    with site.client() as http, site.client() as later:
        job = submit(http, graph)
        info = wait_for(http, job)
        assert info["status"] == "COMPLETED"
        with http.stream("GET", f"/v1/jobs/{job}/result") as r:
            chunks = r.iter_raw(1 << 16)
            data = bytearray(next(chunks))
            site.service.expire(info["expires_at"])  # its time is up: the result goes
            assert not (folder / job).exists()
            assert later.get(f"/v1/jobs/{job}/result").status_code == 404
            for chunk in chunks:
                data += chunk
        assert len(data) == info["result_bytes"]
        assert_bitwise_equal(decode_results(bytes(data)), lm.run_graph(graph))
        after = later.get(f"/v1/jobs/{job}").json()
        assert after["status"] == "COMPLETED"
        assert after["result_bytes"] is None and after["expires_at"] is None
