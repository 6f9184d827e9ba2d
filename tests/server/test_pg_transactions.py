"""How many PostgreSQL transactions a job costs on the cluster stores, pinned (issue 10's
latency target: each one is a round of BEGIN..COMMIT on every job's path), and the
nesting that merges them (pg.py: a `tx()` inside a `tx()` on one thread is one
transaction). A count, never a timing: it cannot drift with the machine's load.

The service runs in this process, not started (no lease or upkeep threads), its one
replica a `ThreadWorker` (tests/faults/live_service.py: worker.py's model in this
thread), on the session's PostgreSQL and S3; the test drives the replica's steps itself
and counts the transactions this thread begins in each. The result is checked against
the plain local run of the same graph. A small graph makes no S3 request (it is a row in
the submission's transaction, s3.py `small`); the result is one PUT.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from faults.live_service import ThreadWorker
from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.config import load_config
from nnglass.server.pg import Database
from nnglass.server.replica import Replica
from nnglass.server.service import Service
from service_fixtures import TINY, small_graph, with_stores

# Per job, on the cluster stores: the request side (quota check, job row, queue row and
# NOTIFY in one; a status read with its queue position in one) and the replica's (the
# claim; RUNNING; the NOTIFYs of it and of the queue's moved positions; the final status
# and its NOTIFY). Raise one only for a reason the commit message gives.
PER_JOB = {"submit": 1, "status": 1, "claim": 1, "share": 0, "run": 3, "done": 1, "download": 1}


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


def test_a_job_makes_few_transactions(tmp_path: Path, tiny_config: Any, tiny_dir: Path,
                                      postgres: Any, s3: Any) -> None:
    stores = {"database": postgres.fresh_database(), "results": s3.url()}
    path = tmp_path / "server.toml"
    path.write_text(with_stores(tiny_config(), stores).replace("PORT", "0").replace("HOME", str(tmp_path)))
    config = load_config(path)
    gate = threading.Event()
    gate.set()
    service = Service(config, worker=lambda model, server: ThreadWorker(model, server, gate))
    try:
        state = service.models[TINY]
        replica = Replica(service, state, ThreadWorker(state.config, config, gate))
        assert replica._start()  # the model loaded: what a graph may name is known
        key_id, _ = service.keys.create("alice")
        lm = LanguageModel(str(tiny_dir), name=TINY)
        graph = small_graph(lm)
        graph_json, tensors = wire.encode(graph)
        db, me = service.jobs.db, threading.current_thread().name
        counts: dict[str, int] = {}

        def counted(step: str, call: Any) -> Any:
            before = db.transactions[me]
            out = call()
            counts[step] = db.transactions[me] - before
            return out

        job = counted("submit", lambda: service.submit(key_id, graph_json, tensors))
        results = service.results

        def objects() -> list[str]:
            listed = results.s3.list_objects_v2(Bucket=results.bucket, Prefix=f"{results.prefix}/{job.id}/")
            return [o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])]

        assert objects() == []  # a small graph: in the submission's transaction, no S3 PUT
        assert counted("status", lambda: service.job_status(key_id, job.id))["status"] == "QUEUED"
        taken = counted("claim", lambda: service.scheduler.next(TINY, timeout=5))
        assert taken == job.id
        others = counted("share", lambda: service.scheduler.take_sharing(
            TINY, job.id, state.config.share_jobs - 1, tokens=state.config.share_tokens))
        assert others == []
        counted("run", lambda: replica.run_jobs([job.id]))
        assert objects() == ["result.safetensors"]  # results always go to S3
        assert counted("done", lambda: service.job_status(key_id, job.id))["status"] == "COMPLETED"
        stream, _ = counted("download", lambda: service.open_result(key_id, job.id))
        with stream:
            remote = decode_results(stream.read())
        assert counts == PER_JOB
        local = lm.run_graph(graph)
        assert remote.keys() == local.keys()
        for node in local:
            assert torch.equal(remote[node], local[node])
    finally:
        service.stop()
