"""The database unreachable (PostgreSQL behind a proxy the test cuts), then back:

- while it is down, a request that needs it is a prompt 503 with Retry-After in the
  usual error shape (the key check cannot tell: never a 401); /health still answers;
- a job that finishes meanwhile is not lost: the service waits the outage out and then
  writes COMPLETED; once the database is back every request answers again and the next
  job runs.

On an in-process live server (tests/faults/live_service.py) whose worker holds the job
until the test lets it finish, during the outage. A locked SQLite database (the
embedded default) is the same promise, in tests/server/test_faults.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cut_proxy import CutProxy
from fault_kit import until
from live_service import live

from nnglass import LanguageModel
from nnglass.server.jobs import JobStatus
from service_fixtures import assert_as_alone, record, submit, wait_for, with_stores


@pytest.fixture(scope="module")
def proxy(postgres: Any) -> Iterator[tuple[CutProxy, str]]:
    url = urlsplit(postgres.fresh_database())
    cut = CutProxy((url.hostname, url.port))
    yield cut, url._replace(netloc=f"{url.username}@127.0.0.1:{cut.port}").geturl()
    cut.close()


def test_an_unreachable_database_is_a_503_then_nothing_is_lost(
    tiny_config: Callable[..., str], proxy: tuple[CutProxy, str], lm: LanguageModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cut, url = proxy
    with live(tmp_path_factory.mktemp("db-down"), with_stores(tiny_config(), {"database": url})) as site, \
            site.client() as http:
        site.gate.clear()
        try:
            held = submit(http, graph_held := record(lm))
            wait_for(http, held, ("RUNNING",))
            cut.cut()  # mid-run
            json = {"Content-Type": "application/json"}
            for send in (lambda: http.get("/v1/models"), lambda: http.get(f"/v1/jobs/{held}"),
                         lambda: http.post("/v1/jobs", content=b"{}", headers=json)):
                start = time.monotonic()
                r = send()
                assert time.monotonic() - start < 15.0  # prompt, not a hung request
                assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
                assert r.json()["detail"]["type"] == "UnavailableError", r.text
            assert httpx.get(f"{site.url}/health", timeout=10).status_code == 200
            site.gate.set()  # the job finishes while the database is away
            until(lambda: site.service.models["tiny"].running == {}, "the worker to finish the job")
            time.sleep(1.0)  # the service meets the outage writing its COMPLETED, and waits
        finally:
            site.gate.set()
            cut.mend()
        assert_as_alone(http, held, lm, graph_held, unavailable_ok=True)
        assert site.service.jobs.get(held).status is JobStatus.COMPLETED  # type: ignore[union-attr]
        graph = record(lm)
        assert_as_alone(http, submit(http, graph), lm, graph, unavailable_ok=True)
