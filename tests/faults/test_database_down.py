"""The database unreachable (PostgreSQL behind a proxy the test cuts), then back:

- while it is down, a request that needs it is a prompt 503 with Retry-After in the
  usual error shape (the key check cannot tell: never a 401); /health still answers;
- a job that was running meanwhile is not lost: its worker finishes, the service waits
  the outage out and then writes COMPLETED; once the database is back every request
  answers again and the next job runs.

A locked SQLite database (the embedded default) is the same promise, in
tests/server/test_faults.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cut_proxy import CutProxy
from fault_kit import assert_as_alone, record, submit, wait_for

from nnglass import LanguageModel
from service_fixtures import slow_graph


@pytest.fixture(scope="module")
def proxy(postgres: Any) -> Iterator[tuple[CutProxy, str]]:
    url = urlsplit(postgres.fresh_database())
    cut = CutProxy((url.hostname, url.port))
    yield cut, url._replace(netloc=f"{url.username}@127.0.0.1:{cut.port}").geturl()
    cut.close()


def test_an_unreachable_database_is_a_503_then_nothing_is_lost(
    start_server: Callable[..., Any], tiny_config: Callable[..., str], proxy: tuple[CutProxy, str],
    lm: LanguageModel,
) -> None:
    cut, url = proxy
    server = start_server("db-down", tiny_config(run_seconds=60), stores={"database": url})
    key = server.keys.create("alice")[1]
    with server.client(key) as http:
        busy = submit(http, graph_busy := slow_graph(lm, 1500, 4))
        wait_for(http, busy, ("RUNNING",))
        cut.cut()  # mid-run
        try:
            json = {"Content-Type": "application/json"}
            for send in (lambda: http.get("/v1/models"), lambda: http.get(f"/v1/jobs/{busy}"),
                         lambda: http.post("/v1/jobs", content=b"{}", headers=json)):
                start = time.monotonic()
                r = send()
                assert time.monotonic() - start < 15.0  # prompt, not a hung request
                assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
                assert r.json()["detail"]["type"] == "UnavailableError", r.text
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            time.sleep(3.0)  # the busy job's run ends meanwhile; its COMPLETED waits for the database
        finally:
            cut.mend()
        assert_as_alone(http, busy, lm, graph_busy)
        graph = record(lm)
        assert_as_alone(http, submit(http, graph), lm, graph)
    server.stop()
