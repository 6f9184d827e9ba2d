"""How many PostgreSQL transactions a job costs on the cluster stores, pinned (issue 10's
latency target: each one is a round of BEGIN..COMMIT on every job's path), and the
nesting that merges them (pg.py: a `tx()` inside a `tx()` on one thread is one
transaction). A count, never a timing: it cannot drift with the machine's load.

The service runs in this process, not started (no lease or upkeep threads), its one
replica a `ThreadWorker` (tests/faults/live_service.py: worker.py's model in this
thread), on the session's PostgreSQL and S3; the test drives the replica's steps itself
and counts the transactions this thread begins in each. The result is checked against
the plain local run of the same graph. A small job makes no S3 request: its graph is a row
in the submission's transaction, its result a row in the transaction that marks it
COMPLETED (s3.py `small`); a large result is one PUT.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from faults.live_service import unstarted
from nnglass import LanguageModel
from nnglass.errors import NotFoundError
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.jobs import JobStatus
from nnglass.server.pg import Database
from nnglass.server.pg_stores import PgSmallObjects
from nnglass.server.replica import Replica
from nnglass.server.s3 import SMALL_BYTES, S3ResultStore
from nnglass.server.service import Service
from saved_values import assert_bitwise_equal
from service_fixtures import TINY, recording, small_graph, with_stores

# Per job, on the cluster stores: the request side (quota check, graph, job row, queue row
# and NOTIFY in one; a queued job's status read and its queue position: two one-statement
# round trips, where one transaction around them would make four) and the replica's
# (the claim, with no round trip for sharing when nothing else waits; RUNNING; the NOTIFYs
# of it and of the queue's moved positions; the result, the final status and its NOTIFY).
# Raise one only for a reason the commit message gives.
PER_JOB = {"submit": 1, "status": 2, "run": 4, "done": 1, "download": 1}


def large_graph(lm: LanguageModel, prompt: str = "hi") -> Any:
    """A trace whose result is larger than SMALL_BYTES (an S3 object, not a row)."""
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output.sum().expand(SMALL_BYTES // 4 + 1024).contiguous().save()
    return tracer.graph


def test_after_commit_runs_once_committed_and_never_after_a_rollback(pg_clean: Database) -> None:
    calls: list[str] = []
    with pg_clean.tx() as conn:
        conn.execute("SELECT 1")
        with pg_clean.tx():
            pg_clean.after_commit(lambda: calls.append("inner"))
        assert calls == []  # the inner block is the same transaction: not committed yet
    assert calls == ["inner"]
    with pytest.raises(RuntimeError), pg_clean.tx():
        pg_clean.after_commit(lambda: calls.append("rolled back"))
        raise RuntimeError("rolled back: the call never runs")
    pg_clean.after_commit(lambda: calls.append("alone"))  # no transaction open: now
    assert calls == ["inner", "alone"]


def test_nested_transactions_are_one(pg_clean: Database) -> None:
    me = threading.current_thread().name
    before = pg_clean.transactions[me]
    with pg_clean.tx() as outer:
        outer.execute("CREATE TABLE t (x INT)")
        with pg_clean.tx() as inner:
            assert inner is outer
            inner.execute("INSERT INTO t VALUES (1)")
    assert pg_clean.transactions[me] == before + 1
    with pytest.raises(RuntimeError), pg_clean.tx() as outer:
        with pg_clean.tx() as inner:
            inner.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("after the inner block: all of it rolls back")
    with pg_clean.tx() as conn:
        assert [r["x"] for r in conn.execute("SELECT x FROM t").fetchall()] == [1]
        conn.execute("DROP TABLE t")


def test_a_failing_statement_fails_its_whole_transaction(pg_clean: Database) -> None:
    """A statement's error fails its whole transaction (nothing of it stays, its
    after-commit calls never run), and a `statement()` alone stands alone."""
    with pg_clean.tx() as conn:
        conn.execute("CREATE TABLE t (x INT PRIMARY KEY)")
    calls: list[str] = []
    with pytest.raises(psycopg.errors.UniqueViolation), pg_clean.tx() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        pg_clean.after_commit(lambda: calls.append("committed"))
        conn.execute("INSERT INTO t VALUES (1)")  # fails
    assert calls == []
    with pg_clean.statement() as conn:
        conn.execute("INSERT INTO t VALUES (3)")
    with pg_clean.tx() as conn:
        assert [r["x"] for r in conn.execute("SELECT x FROM t").fetchall()] == [3]
        conn.execute("DROP TABLE t")


@dataclass
class InProcess:
    service: Service
    replica: Replica
    key_id: str
    lm: LanguageModel

    def run(self, job_id: str) -> None:
        """The replica's steps for one queued job, as its thread takes them."""
        service, config = self.service, self.replica.state.config
        assert service.scheduler.next(TINY, timeout=5) == job_id
        others = service.scheduler.take_sharing(TINY, job_id, config.share_jobs - 1, config.share_tokens)
        assert others == []
        self.replica.run_jobs([job_id])

    def another_frontend(self) -> S3ResultStore:
        """The result store as another frontend holds it (nothing of this one's memory)."""
        return S3ResultStore(self.service.config.results, PgSmallObjects(self.service.jobs.db))

    def objects(self, job_id: str) -> list[str]:
        """The names of the job's S3 objects."""
        results = self.service.results
        listed = results.s3.list_objects_v2(Bucket=results.bucket, Prefix=f"{results.prefix}/{job_id}/")
        return [o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])]


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory, tiny_config: Any, tiny_dir: Path, postgres: Any,
         s3: Any) -> Iterator[InProcess]:
    """The service on the cluster stores, in this process and not started."""
    stores = {"database": postgres.fresh_database(), "results": s3.url()}
    home = tmp_path_factory.mktemp("in-process")
    with unstarted(home, with_stores(tiny_config(), stores)) as (service, replica, _):
        lm = LanguageModel(str(tiny_dir), name=TINY)
        yield InProcess(service, replica, service.keys.create("alice")[0], lm)


def test_a_job_makes_few_transactions(here: InProcess) -> None:
    service, key_id = here.service, here.key_id
    graph = small_graph(here.lm)
    graph_json, tensors = wire.encode(graph)
    db, me = service.jobs.db, threading.current_thread().name
    counts: dict[str, int] = {}

    def counted(step: str, call: Any) -> Any:
        before = db.transactions[me]
        out = call()
        counts[step] = db.transactions[me] - before
        return out

    job = counted("submit", lambda: service.submit(key_id, graph_json, tensors))
    assert here.objects(job.id) == []  # a small graph: in the submission's transaction, no S3 PUT
    assert counted("status", lambda: service.job_status(key_id, job.id))["status"] == "QUEUED"
    counted("run", lambda: here.run(job.id))
    assert here.objects(job.id) == []  # a small result: a row, committed with COMPLETED
    assert counted("done", lambda: service.job_status(key_id, job.id))["status"] == "COMPLETED"
    stream, _ = counted("download", lambda: service.open_result(key_id, job.id))
    with stream:
        assert_bitwise_equal(decode_results(stream.read()), here.lm.run_graph(graph))
    assert counts == PER_JOB
    with here.another_frontend().open(job.id) as stream:  # any frontend serves it, from the row
        assert_bitwise_equal(decode_results(stream.read()), here.lm.run_graph(graph))


def test_a_large_result_is_an_s3_object(here: InProcess) -> None:
    service, key_id = here.service, here.key_id
    graph = large_graph(here.lm)
    job = service.submit(key_id, *wire.encode(graph))
    here.run(job.id)
    assert service.get(key_id, job.id).result_bytes > SMALL_BYTES
    assert here.objects(job.id) == ["result.safetensors"]
    with service.jobs.db.tx() as conn:  # and nothing of it in the database
        rows = conn.execute("SELECT name FROM small_objects WHERE job_id = %s", (job.id,)).fetchall()
    assert [r["name"] for r in rows] == ["graph"]
    for store in (service.results, here.another_frontend()):
        with store.open(job.id) as stream:
            assert_bitwise_equal(decode_results(stream.read()), here.lm.run_graph(graph))


@pytest.mark.parametrize("size", ["small", "large"])
def test_results_expire_from_s3(here: InProcess, size: str) -> None:
    """Past its `expires_at` a job's result and graph leave S3 and the database (the
    upkeep loop's `expire`), a small result (a row) as a large one (an S3 object); its row
    stays, COMPLETED, and the result is a 404."""
    service, key_id = here.service, here.key_id
    graph = (small_graph if size == "small" else large_graph)(here.lm, "expiring")
    job = service.submit(key_id, *wire.encode(graph))
    here.run(job.id)
    done = service.get(key_id, job.id)
    stored = [] if size == "small" else ["result.safetensors"]
    assert done.status is JobStatus.COMPLETED and here.objects(job.id) == stored
    assert service.results.has_graph(job.id) and service.results.result_size(job.id) == done.result_bytes
    service.expire(done.expires_at - 1)  # not yet
    assert here.objects(job.id) == stored and here.another_frontend().result_size(job.id) == done.result_bytes
    service.expire(done.expires_at)
    assert here.objects(job.id) == [] and not service.results.has_graph(job.id)
    fresh = here.another_frontend()
    assert not fresh.has_graph(job.id) and fresh.result_size(job.id) is None
    with pytest.raises(NotFoundError, match="no result"):
        service.open_result(key_id, job.id)
    assert service.get(key_id, job.id).status is JobStatus.COMPLETED  # the record stays


def test_a_page_of_queued_jobs_reads_the_queue_once(here: InProcess) -> None:
    """`GET /v1/jobs` of N queued jobs: the page and one read of the queue, not N."""
    service, key_id = here.service, here.key_id
    jobs = [service.submit(key_id, *wire.encode(small_graph(here.lm, f"page {i}"))) for i in range(3)]
    try:
        db, me = service.jobs.db, threading.current_thread().name
        before = db.transactions[me]
        page, _ = service.list_jobs(key_id, 10)
        shown = service.statuses(page)
        assert db.transactions[me] - before == 2
        queued = {s["id"]: s["position"] for s in shown if s["status"] == "QUEUED"}
        assert queued == {job.id: i for i, job in enumerate(jobs)}
        assert [s["id"] for s in shown] == [j.id for j in page]  # in the page's order
    finally:
        for job in jobs:
            service.cancel(key_id, job.id)
