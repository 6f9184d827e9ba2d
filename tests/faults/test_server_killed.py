"""kill -9 the API process mid-upload, mid-run and mid-download, then start it again on
the same home (database and results). The documented outcomes (docs/security.md,
"Reliability"), one test each, all from one kill:

- mid-run: the job that was RUNNING runs again (attempt 2) and completes as if alone;
  the job queued behind it completes; nothing stays RUNNING or QUEUED. The killed
  server's worker does not outlive it, even stuck in a job (it watches its parent).
- mid-download: the client sees a broken transfer (the body is shorter than its
  Content-Length: an error, never a short file taken as whole); after the restart the
  same result downloads whole.
- mid-upload: the half-sent job was never accepted, so it is nowhere: no row, no files;
  the job store and the result folder hold exactly the accepted jobs, no temporary files.
  An upload killed after its graph was stored and before its row (the database locked
  by another connection holds it there) leaves a folder no row names: the restarted
  server removes it (server/leftovers.py) once it is older than the age a submission
  in flight can have (the test sets its file times back by that much), and nothing else.

The running job is held in the worker by its test hook (NNGLASS_WORKER_TEST_HANG names it
once the server has given it its id; a slow job before it keeps the worker busy until
then); the hook is cleared before the restart, so its second attempt runs normally. The
server runs each job alone (`share_jobs = 1`): these are restarts, not shared passes
(tests/faults/test_worker_killed.py has those).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fault_kit import alive, big, until

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.server.jobs import SQLiteJobStore
from nnglass.server.leftovers import PARTIAL_AGE_S
from nnglass.server.worker import TEST_HANG
from saved_values import assert_bitwise_equal
from service_fixtures import PROMPTS, TERMINAL, assert_as_alone, post, record, slow_graph, submit, wait_for


@dataclass
class Killed:
    """What was going on when the server died, and the server started after it."""

    server: Any  # the restarted service_fixtures.Server
    key: str
    graphs: dict[str, Graph]  # job id -> its graph
    running: str  # held in the worker at the kill
    queued: str  # behind it
    downloaded: str  # its result was half downloaded
    old_worker: int
    download_error: BaseException | None
    received: int  # bytes of the download the client had when the server died
    partial: str  # the folder of the upload killed between its graph and its row


def half_upload(url: str, key: str, body: bytes) -> socket.socket:
    """A POST /v1/jobs whose headers and first half of the body are sent, and no more."""
    host = urlsplit(url)
    sock = socket.create_connection((host.hostname, host.port), timeout=10)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def post_cut_off(server: Any, key: str, graph: Graph) -> None:
    """Submit `graph` to a server that dies before it answers."""
    with server.client(key) as http, contextlib.suppress(httpx.HTTPError):
        r = post(http, graph)
        raise AssertionError(f"the server answered {r.status_code} before it was killed: {r.text}")


def aged(folder: Path, seconds: float) -> None:
    """Set back the modification times of `folder` and its files by `seconds`."""
    for p in [*folder.iterdir(), folder]:
        t = p.stat().st_mtime - seconds
        os.utime(p, (t, t))


@contextlib.contextmanager
def stored_without_row(server: Any, key: str, graph: Graph) -> Iterator[str]:
    """A submission caught between its graph and its row: another connection holds the
    database's write lock (reads go on: WAL), so the server has stored the graph and
    waits to write the row. Yields the job's folder name; the lock goes on exit."""
    jobs = server.home / "jobs"
    before = set(os.listdir(jobs))
    holder = sqlite3.connect(server.home / "nnglass.db", isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    upload = threading.Thread(target=post_cut_off, args=(server, key, graph), daemon=True)
    upload.start()
    try:
        deadline = time.monotonic() + 10
        while not (new := [n for n in set(os.listdir(jobs)) - before if (jobs / n / "graph.json").exists()]):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.005)
        yield new[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        upload.join(timeout=30)


def alone(config_text: str) -> str:
    """The config with co-tenancy off: each job its own pass."""
    return config_text.replace("[models.policy.limits]", "share_jobs = 1\n\n[models.policy.limits]", 1)


@pytest.fixture(scope="module")
def killed(start_server: Callable[..., Any], tiny_config: Callable[..., str],
           tmp_path_factory: pytest.TempPathFactory, lm: LanguageModel) -> Iterator[Killed]:
    home = tmp_path_factory.mktemp("killed")
    hang = home / "hang"
    hang.write_text("")
    with pytest.MonkeyPatch.context() as mp:  # the server, and so its worker, inherit it
        mp.setenv(TEST_HANG, str(hang))
        first = start_server("killed", alone(tiny_config(run_seconds=20)), home=home)
    key = first.keys.create("alice")[1]
    graphs: dict[str, Graph] = {}
    with first.client(key) as http:
        for graph in (big(lm, 16), slow_graph(lm, 1500, 4)):  # 16 MiB: more than loopback buffers hold
            graphs[submit(http, graph)] = graph
        downloaded, busy = list(graphs)
        running = submit(http, graph := record(lm, PROMPTS[1]))
        graphs[running] = graph
        hang.write_text(running)  # before `busy` ends, so the worker holds it when it starts
        wait_for(http, busy)
        assert wait_for(http, running, ("RUNNING", *TERMINAL))["status"] == "RUNNING"
        queued = submit(http, graph := record(lm, PROMPTS[2]))
        graphs[queued] = graph
        assert wait_for(http, downloaded)["status"] == "COMPLETED"
        old_worker = first.worker_pid("tiny")
        received, error = 0, None
        with http.stream("GET", f"/v1/jobs/{downloaded}/result") as download:
            chunks = download.iter_raw(1 << 16)
            received += len(next(chunks))
            upload = half_upload(first.url, key, wire.encode(record(lm, PROMPTS[3]))[0])
            with stored_without_row(first, key, record(lm, PROMPTS[0])) as partial:
                first.kill()  # SIGKILL, mid-upload (two), mid-run, mid-download
            try:
                for chunk in chunks:
                    received += len(chunk)
            except httpx.HTTPError as e:
                error = e
        upload.close()
    hang.write_text("")
    assert (home / "jobs" / partial / "graph.json").is_file()  # the kill came between graph and row
    aged(home / "jobs" / partial, PARTIAL_AGE_S + 60)  # as if the restart came that much later
    second = start_server("killed", alone(tiny_config(run_seconds=20)), home=home)
    yield Killed(second, key, graphs, running, queued, downloaded, old_worker, error, received, partial)
    second.stop()


def test_a_running_job_runs_again_and_completes(killed: Killed, lm: LanguageModel) -> None:
    with killed.server.client(killed.key) as http:
        assert_as_alone(http, killed.running, lm, killed.graphs[killed.running])
        assert_as_alone(http, killed.queued, lm, killed.graphs[killed.queued])
        for job in killed.graphs:
            assert wait_for(http, job)["status"] == "COMPLETED"
    with SQLiteJobStore(killed.server.home / "nnglass.db") as store:
        assert store.get(killed.running).attempts == 2  # the killed run, then this one
        assert store.get(killed.queued).attempts == 1
        assert store.unfinished() == []


def test_the_killed_servers_worker_does_not_outlive_it(killed: Killed) -> None:
    until(lambda: not alive(killed.old_worker), "the old worker, stuck in a job, to exit")


def test_a_half_download_is_an_error_and_downloads_whole_after(killed: Killed, lm: LanguageModel) -> None:
    graph = killed.graphs[killed.downloaded]
    with killed.server.client(killed.key) as http:
        size = wait_for(http, killed.downloaded)["result_bytes"]
        assert killed.received < size  # the kill came mid-transfer
        assert isinstance(killed.download_error, httpx.RemoteProtocolError), killed.download_error
        r = http.get(f"/v1/jobs/{killed.downloaded}/result")
        assert r.status_code == 200 and len(r.content) == size
        assert_bitwise_equal(decode_results(r.content), lm.run_graph(graph))


def test_a_half_upload_leaves_nothing(killed: Killed) -> None:
    home = killed.server.home
    until(lambda: not (home / "jobs" / killed.partial).exists(), "the half-written job to be swept")
    with killed.server.client(killed.key) as http:
        listed = {j["id"] for j in http.get("/v1/jobs").json()["jobs"]}
    assert listed == set(killed.graphs)
    with SQLiteJobStore(home / "nnglass.db") as store:
        assert {j.id for j in store.by_key(store.get(killed.running).key_id, 100)} == set(killed.graphs)
    assert sorted(p.name for p in (home / "jobs").iterdir()) == sorted(killed.graphs)
    leftovers = [str(p) for p in (home / "jobs").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary file of a write the kill cut short

