"""Two `nnglass serve` frontends on one PostgreSQL database and one S3 bucket: any
frontend answers any job (status, events, result), the queue holds across both (the
quota across frontends: test_store_contract.py, and test_hostile's PostgreSQL run), no
job runs twice, a revoke through either reaches both (each remembers the keys it verified),
a bounded run of benchmarks/load_frontends.py (clients of their own keys,
each job submitted to one frontend and followed on the other) loses nothing and hands
nobody another key's job, and a frontend killed with SIGKILL mid-job loses nothing (the
survivor runs the job again). The servers are real processes; PostgreSQL and S3 are the
session's (tests/components.py)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.server.auth import KEY_CACHE_S
from saved_values import assert_bitwise_equal
from service_fixtures import TERMINAL, recording, small_graph, submit, wait_for

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import load_frontends  # benchmarks/ is not a package


def slow_graph(lm: LanguageModel, n: int = 1500, k: int = 10) -> Graph:
    """A job that keeps a worker busy for a few seconds."""
    with recording(lm.trace("hi")) as tracer:
        m = lm.model.layers[0].output.sum().expand(n, n).contiguous()
        for _ in range(k):
            m = m @ m
        m.sum().save()
    return tracer.graph


def running_on(server: Any, key: str) -> int:
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    return sum(m["running"] for m in models)


@pytest.fixture(scope="module")
def pair(start_server: Callable[..., Any], tiny_config: Callable[..., str], postgres: Any,
         s3: Any) -> Iterator[tuple[Any, Any]]:
    stores = {"database": postgres.fresh_database(), "results": s3.url()}
    a = start_server("frontend-a", tiny_config(run_seconds=60), stores=stores)
    b = start_server("frontend-b", tiny_config(run_seconds=60), stores=stores)
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name="tiny")


def test_any_frontend_answers_any_job(pair: tuple[Any, Any], lm: LanguageModel) -> None:
    a, b = pair
    key = a.keys.create("alice")[1]  # made through A's database: B knows it too
    graph = small_graph(lm, "hello there")
    with a.client(key) as on_a, b.client(key) as on_b:
        job = submit(on_a, graph)
        with on_b.stream("GET", f"/v1/jobs/{job}/events") as events:  # B's stream, A's job
            lines = [line for line in events.iter_lines() if line.startswith("data: ")]
        seen = [json.loads(line[6:])["status"] for line in lines]
        assert seen[-1] == "COMPLETED"
        info = on_b.get(f"/v1/jobs/{job}").json()
        result = on_b.get(f"/v1/jobs/{job}/result")
        assert result.status_code == 200 and int(result.headers["content-length"]) == info["result_bytes"]
        assert_bitwise_equal(decode_results(result.content), lm.run_graph(graph))
        assert on_a.get(f"/v1/jobs/{job}/result").content == result.content
        other = b.keys.create("mallory")[1]
        with b.client(other) as stranger:  # another key sees nothing on either frontend
            assert stranger.get(f"/v1/jobs/{job}").status_code == 404
            assert stranger.get(f"/v1/jobs/{job}/result").status_code == 404


def test_a_revoke_reaches_both_frontends(pair: tuple[Any, Any]) -> None:
    """Each frontend remembers the keys it verified; a revoke through the CLI's store (no
    frontend's own) ends them on both, within the documented bound (docs/security.md)."""
    a, b = pair
    key = a.keys.create("erin")[1]
    with a.client(key) as on_a, b.client(key) as on_b:
        for http in (on_a, on_b):
            assert http.get("/v1/jobs").status_code == 200  # checked, and remembered
        assert a.keys.revoke("erin")
        deadline = time.monotonic() + KEY_CACHE_S
        while any(http.get("/v1/jobs").status_code != 401 for http in (on_a, on_b)):
            assert time.monotonic() < deadline, "a revoked key was still served past the bound"
            time.sleep(0.02)


def test_every_job_runs_once_across_frontends(pair: tuple[Any, Any], lm: LanguageModel) -> None:
    a, b = pair
    keys = [a.keys.create(f"user{i}")[1] for i in range(3)]
    graphs = {f"prompt {i}": small_graph(lm, f"prompt {i}") for i in range(12)}
    jobs: dict[str, tuple[str, str]] = {}
    for i, (prompt, graph) in enumerate(graphs.items()):
        server, key = (a, b)[i % 2], keys[i % 3]
        with server.client(key) as http:
            jobs[submit(http, graph)] = (prompt, key)
    for job, (prompt, key) in jobs.items():
        with b.client(key) as http:
            assert wait_for(http, job)["status"] == "COMPLETED"
            assert_bitwise_equal(decode_results(http.get(f"/v1/jobs/{job}/result").content),
                                 lm.run_graph(graphs[prompt]))
    with psycopg.connect(a.stores["database"]) as conn:
        rows = conn.execute("SELECT id, attempts FROM jobs WHERE id = ANY(%s)", (list(jobs),)).fetchall()
    attempts = dict(rows)
    assert attempts == dict.fromkeys(jobs, 1)  # each started exactly once, by one frontend


def test_concurrent_clients_across_frontends_lose_nothing_and_mix_nothing_up(
    pair: tuple[Any, Any], lm: LanguageModel
) -> None:
    """6 clients x 5 jobs of every kind (benchmarks/load_frontends.py; the 200 x 10 run is in
    docs/benchmarks.md): each ends as its local run says, on its own key, and the jobs the
    two frontends say they finished add up (each job ended by one of them)."""
    a, b = pair
    keys = [a.keys.create(f"load{i}")[1] for i in range(6)]
    row = load_frontends.drive([a.url, b.url], keys, lm, jobs=5, timeout=300)
    assert (row["lost"], row["wrong"], row["wrong_key"], row["stuck"]) == ([], [], [], []), row
    assert row["ended"] == 30 and not load_frontends.failed(row), row
    assert {outcome.split(":")[0] for outcome in row["outcomes"]} == set(load_frontends.load.KINDS), row
    assert sum(row["finished_by_frontend"]) >= 30, row


def test_a_frontend_killed_mid_job_loses_nothing(pair: tuple[Any, Any], lm: LanguageModel) -> None:
    a, b = pair
    key = a.keys.create("survivor")[1]
    graph = slow_graph(lm)
    with a.client(key) as on_a, b.client(key) as on_b:
        job = submit(on_a, graph)
        wait_for(on_b, job, ("RUNNING", *TERMINAL))
        victim, survivor = (a, b) if running_on(a, key) else (b, a)
        assert running_on(victim, key) == 1
        victim.kill()  # SIGKILL: no goodbye, its lease just stops
        with survivor.client(key) as http:
            done = wait_for(http, job, timeout=120)
            assert done["status"] == "COMPLETED", done  # run again (attempt 2) by the survivor
            result = http.get(f"/v1/jobs/{job}/result").content
            assert_bitwise_equal(decode_results(result), lm.run_graph(graph))
