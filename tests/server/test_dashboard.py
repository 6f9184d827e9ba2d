"""The dashboard at `/`, `GET /v1/jobs` and `GET /v1/events`, against a real server.

The API tests use httpx (and raw HTTP for paths a client library would normalize). The
browser test drives Debian's chromium through Playwright: it logs in with a key, watches
jobs sent from Python move on the page, cancels one with the page's button, downloads a
result, and never sees another key's job. Screenshots go to a temporary folder (its path
is printed). Without chromium or Playwright the browser test skips, except under CI
(`CI` set), where it fails: CI installs chromium (.ci/run).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from service_fixtures import (  # tests/service_fixtures.py, shared
    recording,
    slow_graph,
    small_graph,
    submit,
    wait_for,
)

NAME = "tiny"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE_WHERE = '<img src=x id="pwned">.py:7'  # a "file:line" a client made up: shown as text


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tiny_config: Callable[..., str]) -> Iterator[Any]:
    # One job per pass, so a job queued behind another stays QUEUED until that one ends.
    text = tiny_config().replace("[models.policy.limits]", "share_jobs = 1\n\n[models.policy.limits]", 1)
    assert "share_jobs = 1" in text
    server = start_server("dashboard", text)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    """The tiny model, only to record graphs (they run on the server)."""
    return LanguageModel(str(tiny_dir), name=NAME)


def failing_graph(lm: LanguageModel) -> Graph:
    """Fails on the server (index 50 of a 2-token prompt), at a line that is HTML."""
    with recording(lm.trace("hi")) as tracer:
        lm.model.layers[0].output[:, 50].save()
    graph = tracer.graph
    nodes = [dataclasses.replace(n, where=HOSTILE_WHERE) for n in graph.nodes]
    return dataclasses.replace(graph, nodes=nodes)


def client(server: Any, name: str) -> httpx.Client:
    """A client with a new key of its own."""
    return server.client(server.keys.create(name)[1])


def raw_get(url: str, target: str) -> int:
    """The status of `GET target` sent byte for byte (httpx would normalize the path)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


# --- the API ------------------------------------------------------------------------------


def test_list_jobs_pages_newest_first_and_only_mine(server: Any, lm: LanguageModel) -> None:
    with client(server, "lister") as mine, client(server, "other") as other:
        sent = [submit(mine, small_graph(lm)) for _ in range(5)]
        theirs = [submit(other, small_graph(lm)) for _ in range(2)]
        for job_id in sent:
            wait_for(mine, job_id)
        seen, before, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"before": before} if before else {})}
            page = mine.get("/v1/jobs", params=params).json()
            assert len(page["jobs"]) <= 2
            seen += page["jobs"]
            pages += 1
            before = page["next"]
            if before is None:
                break
        assert pages == 3 and [j["id"] for j in seen] == sent[::-1]  # newest first, each once
        assert seen == [mine.get(f"/v1/jobs/{j}").json() for j in sent[::-1]]  # the status objects
        assert [j["id"] for j in other.get("/v1/jobs").json()["jobs"]] == theirs[::-1]
        assert mine.get("/v1/jobs", params={"limit": 100000}).json()["next"] is None  # capped, not refused

        # Another key's job is no cursor (404, as for a missing job); bad limits are 400.
        assert mine.get("/v1/jobs", params={"before": theirs[0]}).status_code == 404
        for limit in ("0", "-1", "abc", "1.5"):
            r = mine.get("/v1/jobs", params={"limit": limit})
            assert r.status_code == 400 and r.json()["detail"]["type"] == "MalformedError", limit
    assert httpx.get(f"{server.url}/v1/jobs").status_code == 401


def test_event_stream_carries_only_the_callers_jobs(server: Any, lm: LanguageModel) -> None:
    with client(server, "watcher") as mine, client(server, "stranger") as other:
        with mine.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            events: list[tuple[str, Any]] = []

            def until(done: Callable[[], bool]) -> None:
                kind = ""
                for text in lines:
                    if text.startswith("event:"):
                        kind = text[6:].strip()
                    elif text.startswith("data:"):
                        events.append((kind, json.loads(text[5:])))
                        if done():
                            return

            until(lambda: bool(events))  # a snapshot of the models comes first
            kind, models = events[0]
            assert kind == "models" and models[0]["name"] == NAME
            assert {"replicas_alive", "replicas_busy", "last_pass_jobs", "jobs_last_minute"} <= set(models[0])

            theirs = submit(other, small_graph(lm))
            assert wait_for(other, theirs)["status"] == "COMPLETED"
            job_id = submit(mine, small_graph(lm))
            until(lambda: events[-1][0] == "job" and events[-1][1]["status"] == "COMPLETED")
        jobs = [data for kind, data in events if kind == "job"]
        assert {j["id"] for j in jobs} == {job_id}  # the stranger's job never came
        assert theirs not in json.dumps(events)
        assert jobs[-1] == mine.get(f"/v1/jobs/{job_id}").json()  # the status object, as GET answers it
    assert httpx.get(f"{server.url}/v1/events").status_code == 401


def test_event_streams_per_key_are_bounded(server: Any) -> None:
    from nnglass.server.dashboard import MAX_STREAMS_PER_KEY

    with client(server, "many-tabs") as tabs, client(server, "one-tab") as other, ExitStack() as stack:
        for _ in range(MAX_STREAMS_PER_KEY):
            assert stack.enter_context(tabs.stream("GET", "/v1/events")).status_code == 200
        with tabs.stream("GET", "/v1/events") as refused:
            assert refused.status_code == 429
        with other.stream("GET", "/v1/events") as theirs:  # another key is not held up
            assert theirs.status_code == 200
        stack.close()  # closed streams free their places
        deadline = time.monotonic() + 30
        while True:
            with tabs.stream("GET", "/v1/events") as again:
                if again.status_code == 200 or time.monotonic() > deadline:
                    assert again.status_code == 200
                    break
            time.sleep(0.2)


def test_only_the_page_and_its_files_are_open(server: Any) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "form-action 'none'" in page.headers["content-security-policy"]
    assert 'name="' not in page.text.split('id="login"')[1].split("</form>")[0]  # nothing a form could send
    for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    assert "?key=" not in httpx.get(f"{server.url}/static/dashboard.js").text

    closed = [
        "/v1/jobs", "/v1/events", "/v1/models", "/metrics", "/docs", "/openapi.json",
        "/static/../v1/jobs", "/static/%2e%2e/v1/jobs", "/static/..%2fv1/models",
        "/static/dashboard.js/../../metrics",
        "/static/./dashboard.js/../../v1/models", "/static//v1/models", "//v1/models", "/./v1/models",
        "/static/", "/static", "/static/index.html", "/static/nope.js", "/static/dashboard.js%00",
        "/STATIC/dashboard.js", "/index.html", "/%2f", "/v1/../static/dashboard.js/../../v1/jobs",
        "/static/dashboard.js/", "/static/dashboard.css/x",
    ]
    for target in closed:
        assert raw_get(server.url, target) == 401, target
    key = server.keys.create("static-reader")[1]
    r = httpx.get(f"{server.url}/static/nope.js", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 404  # with the key: still no file but the shipped ones


# --- in a browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python (the `dev` extra)")
    if not Path(CHROMIUM).exists():
        _missing("chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser test needs {what}; .ci/run installs chromium when it is missing")
    pytest.skip(f"no {what}")


def test_dashboard_in_a_browser(
    server: Any, lm: LanguageModel, browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from playwright.sync_api import expect

    shots = tmp_path_factory.mktemp("screenshots")
    print(f"dashboard screenshots in {shots}")
    key_a, key_b = server.keys.create("page-a")[1], server.keys.create("page-b")[1]
    with server.client(key_a) as a, server.client(key_b) as b:
        hidden = submit(b, small_graph(lm))  # another key's job, there before the page opens
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
        page = context.new_page()
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        crashes: list[str] = []
        page.on("pageerror", lambda error: crashes.append(str(error)))
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)

        page.goto(f"{server.url}/")
        page.fill("#key", "nng_not-a-key")
        page.click("#login-button")
        expect(page.locator("#login-error")).to_contain_text("refused")
        page.fill("#key", key_a)
        page.click("#login-button")
        card = page.locator(f'[data-model="{NAME}"]')
        expect(card).to_contain_text("ready")
        expect(card).to_contain_text("weights")
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#health")).to_have_text("1/1 models ready")
        page.screenshot(path=str(shots / "1-model.png"), full_page=True)

        def status(job_id: str) -> Any:
            return page.locator(f'tr[data-job="{job_id}"] td.status')

        blocker = submit(a, slow_graph(lm, k=10))
        watched = submit(a, slow_graph(lm, k=10))
        expect(status(watched)).to_have_text("QUEUED")
        row = page.locator(f'tr[data-job="{watched}"]')
        expect(row.locator("td.queue")).to_have_text(re.compile(r"^(next|\d+ ahead)$"))
        expect(row).to_have_attribute("data-history", re.compile(r"^QUEUED RUNNING"))
        page.screenshot(path=str(shots / "2-running.png"), full_page=True)
        expect(status(watched)).to_have_text("COMPLETED")
        expect(row).to_have_attribute("data-history", "QUEUED RUNNING COMPLETED")
        expect(status(blocker)).to_have_text("COMPLETED")

        # The result, fetched with the key and saved from a Blob URL.
        with page.expect_download() as download:
            row.locator("button.download").click()
        saved = Path(download.value.path()).read_bytes()
        assert len(saved) == a.get(f"/v1/jobs/{watched}").json()["result_bytes"]
        assert saved == a.get(f"/v1/jobs/{watched}/result").content

        # Cancel a queued job with the page's button.
        submit(a, slow_graph(lm, k=10))
        doomed = submit(a, small_graph(lm))
        expect(status(doomed)).to_have_text("QUEUED")
        page.locator(f'tr[data-job="{doomed}"] button.cancel').click()
        expect(status(doomed)).to_have_text("CANCELLED")
        gone = a.get(f"/v1/jobs/{doomed}").json()
        assert gone["status"] == "CANCELLED" and gone["started_at"] is None

        # An error shows the user's line as text: markup in it stays text.
        failed = submit(a, failing_graph(lm))
        expect(status(failed)).to_have_text("ERROR")
        expect(page.locator(f'tr[data-job="{failed}"] td.error')).to_contain_text(HOSTILE_WHERE)
        assert page.locator("#pwned").count() == 0
        page.screenshot(path=str(shots / "3-jobs.png"), full_page=True)

        # Another key's job is nowhere, neither on the page nor in anything it fetched.
        assert wait_for(b, hidden)["status"] == "COMPLETED"
        expect(page.locator("tbody#job-rows tr")).to_have_count(len(a.get("/v1/jobs").json()["jobs"]))
        assert page.locator(f'[data-job="{hidden}"]').count() == 0 and hidden not in page.content()

        # A reload keeps the key (this tab's session) and shows the same jobs again.
        page.reload()
        expect(status(watched)).to_have_text("COMPLETED")
        assert page.evaluate("sessionStorage.getItem('nnglass.key')") == key_a
        other_tab = context.new_page()  # a new tab has its own session: no key
        other_tab.goto(f"{server.url}/")
        expect(other_tab.locator("#login")).to_be_visible()
        other_tab.close()
        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('nnglass.key')") is None
        context.close()

    assert not crashes  # no uncaught exception in the page's script
    assert urls and not [u for u in urls if key_a in u or "key=" in u]  # the key never was in a URL
    assert not [u for u in urls if not u.startswith(server.url)]  # nothing from anywhere else
