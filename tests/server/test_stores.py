"""The server's persistence: API keys, the job store, result directories. The `keys`
and `jobs` fixtures run each test against every implementation (SQLite, PostgreSQL);
tests/server/test_store_contract.py holds the rest of the contract."""

from __future__ import annotations

import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nnglass.server.auth import KeyStore
from nnglass.server.jobs import Job, JobStatus, SQLiteJobStore, new_job_id
from nnglass.server.pg_stores import PgJobStore, PgKeyStore
from nnglass.server.results import DirResultStore

# --- keys -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def keys(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "postgresql":
        yield PgKeyStore(request.getfixturevalue("pg_clean"))
        return
    with KeyStore(tmp_path / "nnglass.db") as store:
        yield store


def test_key_create_and_verify(keys: KeyStore) -> None:
    key_id, key = keys.create("alice")
    assert key.startswith("nng_") and len(key) >= 4 + 43
    assert keys.verify(key) == key_id
    other_id, other = keys.create("bob")
    assert other_id != key_id and other != key
    assert keys.verify(other) == other_id


@pytest.mark.parametrize(
    "bad", [None, "", "nng_", "nng_wrong", "Bearer nng_x", "x" * 10_000, "nng_" + "x" * 10_000, 42]
)
def test_key_verify_refuses_wrong_keys(keys: KeyStore, bad: object) -> None:
    keys.create("alice")
    assert keys.verify(bad) is None  # type: ignore[arg-type]


def test_key_verify_refuses_near_miss(keys: KeyStore) -> None:
    _, key = keys.create("alice")
    assert keys.verify(key[:-1]) is None
    assert keys.verify(key + "A") is None
    assert keys.verify(key.upper()) is None


def test_key_revoke_by_name_and_id(keys: KeyStore) -> None:
    _, a = keys.create("alice")
    b_id, b = keys.create("bob")
    assert keys.revoke("alice")
    assert keys.verify(a) is None
    assert keys.verify(b) == b_id
    assert keys.revoke(b_id)
    assert keys.verify(b) is None
    assert not keys.revoke("alice")  # already revoked
    assert not keys.revoke("nobody")


def test_key_names_unique_among_live_keys(keys: KeyStore) -> None:
    keys.create("alice")
    with pytest.raises(ValueError, match="alice"):
        keys.create("alice")
    with pytest.raises(ValueError):
        keys.create("  ")
    keys.revoke("alice")
    new_id, new = keys.create("alice")  # the name is free again
    assert keys.verify(new) == new_id


def test_key_list_never_shows_secrets(keys: KeyStore) -> None:
    a_id, a = keys.create("alice")
    keys.create("bob")
    keys.revoke("bob")
    listed = keys.list()
    assert [k["name"] for k in listed] == ["alice", "bob"]
    assert {frozenset(k) for k in listed} == {frozenset({"id", "name", "created", "revoked"})}
    assert listed[0]["id"] == a_id and listed[0]["revoked"] is None
    assert listed[1]["revoked"] is not None
    assert a not in repr(listed)


def test_key_stored_hashed_not_plain(tmp_path: Path) -> None:
    db = tmp_path / "nnglass.db"
    with KeyStore(db) as store:
        _, key = store.create("alice")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("nnglass.db"))
    assert key.encode() not in raw
    assert key[4:].encode() not in raw
    with sqlite3.connect(db) as conn:
        cells = [str(c) for row in conn.execute("SELECT * FROM api_keys") for c in row]
    assert all(key[4:] not in c for c in cells)
    with KeyStore(db) as again:  # survives reopening
        assert again.verify(key) is not None


def test_key_verify_from_threads(keys: KeyStore) -> None:
    pairs = [keys.create(f"user{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: keys.verify(p[1]), pairs * 50))
    assert got == [p[0] for p in pairs] * 50


# --- jobs -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "postgresql":
        yield PgJobStore(request.getfixturevalue("pg_clean"))
        return
    with SQLiteJobStore(tmp_path / "nnglass.db") as store:
        yield store


def test_job_ids_unguessable() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)
    assert Job(key_id="k", model="m").id != Job(key_id="k", model="m").id


def test_job_create_get_roundtrip(jobs: SQLiteJobStore) -> None:
    job = Job(key_id="k1", model="gpt", mode="generate")
    created = jobs.create(job)
    assert created.seq is not None
    got = jobs.get(job.id)
    assert got == created
    assert got.status is JobStatus.RECEIVED and got.error is None and got.attempts == 0
    assert jobs.get("no-such-job-id-000") is None
    assert jobs.get("a" * 20 + "\x00") is None  # PostgreSQL text cannot hold it: still just no job
    with pytest.raises(ValueError):
        jobs.create(job)


def test_job_update_fields(jobs: SQLiteJobStore) -> None:
    job = jobs.create(Job(key_id="k", model="m"))
    assert jobs.update(job.id, status=JobStatus.QUEUED, queued_at=1.0)
    assert jobs.update(job.id, status="RUNNING", started_at=2.0, attempts=1)
    err = {"message": "shape mismatch", "where": "exp.py:12", "type": "ExecutionError"}
    assert jobs.update(job.id, status=JobStatus.ERROR, finished_at=3.0, error=err)
    got = jobs.get(job.id)
    assert got is not None
    assert (got.status, got.queued_at, got.started_at, got.finished_at, got.attempts) == (
        JobStatus.ERROR,
        1.0,
        2.0,
        3.0,
        1,
    )
    assert got.error == err
    assert not jobs.update("missing-job-id-0000", status=JobStatus.QUEUED)
    with pytest.raises(ValueError):
        jobs.update(job.id, id="other")
    with pytest.raises(ValueError):
        jobs.update(job.id, colour="red")


def test_job_start_only_from_queued(jobs: SQLiteJobStore) -> None:
    job = jobs.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
    started = jobs.start(job.id, 7.0)
    assert started is not None and (started.id, started.status, started.started_at, started.attempts) == (
        job.id, JobStatus.RUNNING, 7.0, 1)
    assert jobs.get(job.id) == started  # what it answered is what is stored
    assert jobs.start(job.id, 8.0) is None  # already running: not started twice
    cancelled = jobs.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
    assert jobs.update(cancelled.id, status=JobStatus.CANCELLED)
    assert jobs.start(cancelled.id, 9.0) is None and jobs.get(cancelled.id).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert jobs.start("missing-job-id-0000", 9.0) is None


def test_job_status_terminal() -> None:
    assert {s for s in JobStatus if s.terminal} == {JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED}
    assert JobStatus("QUEUED") is JobStatus.QUEUED and JobStatus.QUEUED == "QUEUED"


def test_job_terminal_status_is_final(jobs: SQLiteJobStore) -> None:
    job = jobs.create(Job(key_id="k", model="m", status=JobStatus.RUNNING))
    assert jobs.update(job.id, status=JobStatus.COMPLETED, finished_at=5.0, result_bytes=10)
    for late in (JobStatus.CANCELLED, JobStatus.ERROR, JobStatus.QUEUED, JobStatus.COMPLETED):
        assert not jobs.update(job.id, status=late, finished_at=9.0)
    got = jobs.get(job.id)
    assert got is not None and got.status is JobStatus.COMPLETED and got.finished_at == 5.0
    assert jobs.update(job.id, expires_at=100.0)  # non-status fields may still change
    assert jobs.get(job.id).expires_at == 100.0  # type: ignore[union-attr]


def test_job_by_status_creation_order(jobs: SQLiteJobStore) -> None:
    made = [
        jobs.create(Job(key_id=f"k{i % 2}", model="a" if i % 3 else "b", created_at=100.0)) for i in range(9)
    ]
    for j in made[::2]:
        jobs.update(j.id, status=JobStatus.QUEUED)
    queued = jobs.by_status(JobStatus.QUEUED)
    assert [j.id for j in queued] == [j.id for j in made[::2]]
    assert [j.id for j in jobs.by_status(JobStatus.QUEUED, model="a")] == [
        j.id for j in made[::2] if j.model == "a"]
    assert [j.id for j in jobs.by_status(JobStatus.QUEUED, model="b")] == [
        j.id for j in made[::2] if j.model == "b"
    ]
    both = jobs.by_status(JobStatus.QUEUED, JobStatus.RECEIVED)
    assert [j.id for j in both] == [j.id for j in made]
    assert jobs.by_status() == []
    jobs.update(made[1].id, status=JobStatus.RUNNING)
    jobs.update(made[3].id, status=JobStatus.CANCELLED)
    unfinished = {j.id for j in jobs.unfinished()}
    assert unfinished == {j.id for j in made} - {made[3].id}


def test_job_cancel_races_completion_first_terminal_wins(tmp_path: Path) -> None:
    # Two stores on one file (two connections) and many threads: exactly one terminal write wins.
    db = tmp_path / "nnglass.db"
    a, b = SQLiteJobStore(db), SQLiteJobStore(db)
    finals = [JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.ERROR, JobStatus.CANCELLED] * 2
    try:
        for _ in range(20):
            job = a.create(Job(key_id="k", model="m", status=JobStatus.RUNNING))
            barrier = threading.Barrier(8)

            def race(i: int, job_id: str = job.id, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                store = a if i % 2 else b
                return store.update(job_id, status=finals[i], finished_at=float(i))

            with ThreadPoolExecutor(8) as pool:
                won = list(pool.map(race, range(8)))
            assert sum(won) == 1
            winner = won.index(True)
            got = a.get(job.id)
            assert got is not None and got.status is finals[winner] and got.finished_at == float(winner)
    finally:
        a.close()
        b.close()


def test_job_concurrent_updates_from_threads(jobs: SQLiteJobStore) -> None:
    made = [jobs.create(Job(key_id="k", model="m")) for _ in range(32)]

    def walk(job: Job) -> None:
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            assert jobs.update(job.id, status=status)
        for n in range(1, 6):
            assert jobs.update(job.id, attempts=n)
        assert jobs.update(job.id, status=JobStatus.COMPLETED, result_bytes=len(job.id))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(walk, made))
    for job in made:
        got = jobs.get(job.id)
        assert got is not None and (got.status, got.attempts, got.result_bytes) == (
            JobStatus.COMPLETED,
            5,
            len(job.id),
        )


def test_job_expired_only_terminal(jobs: SQLiteJobStore) -> None:
    old_done = jobs.create(Job(key_id="k", model="m", status=JobStatus.COMPLETED, expires_at=10.0))
    old_err = jobs.create(Job(key_id="k", model="m", status=JobStatus.ERROR, expires_at=20.0))
    jobs.create(Job(key_id="k", model="m", status=JobStatus.COMPLETED, expires_at=50.0))
    jobs.create(Job(key_id="k", model="m", status=JobStatus.COMPLETED))  # never expires
    jobs.create(Job(key_id="k", model="m", status=JobStatus.RUNNING, expires_at=1.0))  # still live
    assert [j.id for j in jobs.expired(20.0)] == [old_done.id, old_err.id]


def test_job_store_persists_across_reopen(tmp_path: Path) -> None:
    db = tmp_path / "home" / "nnglass.db"
    err = {"message": "boom", "where": "x.py:3", "type": "ExecutionError"}
    with SQLiteJobStore(db) as store:
        first = store.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
        second = store.create(Job(key_id="k", model="m", status=JobStatus.RUNNING))
        store.update(second.id, status=JobStatus.ERROR, error=err)
    with KeyStore(db) as keys:  # the same file holds keys too
        _, key = keys.create("alice")
    with SQLiteJobStore(db) as store:
        assert store.get(first.id) == first
        got = store.get(second.id)
        assert got is not None and got.status is JobStatus.ERROR and got.error == err
        third = store.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
        assert third.seq is not None and first.seq is not None and third.seq > first.seq
        assert [j.id for j in store.by_status(JobStatus.QUEUED, model="m")] == [first.id, third.id]
    with KeyStore(db) as keys:
        assert keys.verify(key) is not None


# --- results --------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path: Path) -> DirResultStore:
    return DirResultStore(tmp_path / "results")


def test_results_graph_and_result(results: DirResultStore) -> None:
    jid = new_job_id()
    results.save_graph(jid, b'{"version": "1.0"}')
    graph, tensors = results.graph_paths(jid)
    assert graph.read_bytes() == b'{"version": "1.0"}' and tensors is None
    jid2 = new_job_id()
    results.save_graph(jid2, b"{}", b"TENSORS")
    graph2, tensors2 = results.graph_paths(jid2)
    assert tensors2 is not None and tensors2.read_bytes() == b"TENSORS"
    assert graph2.parent == tensors2.parent == results.root / jid2

    assert results.result_size(jid) is None
    results.write_result(jid, b"x" * 1000)
    assert results.result_size(jid) == 1000
    assert results.result_path(jid) == results.root / jid / "result.safetensors"
    with results.open(jid) as f:
        assert f.read() == b"x" * 1000


def test_results_write_is_atomic(results: DirResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    jid = new_job_id()
    results.write_result(jid, b"old")
    def failing_replace(src: str, dst: str) -> None:  # the write failed before the swap
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        results.write_result(jid, b"new, longer, half-written")
    monkeypatch.undo()
    assert results.result_path(jid).read_bytes() == b"old"  # the old result, whole
    assert sorted(p.name for p in (results.root / jid).iterdir()) == ["result.safetensors"]  # no temp left
    results.write_result(jid, b"new")
    assert results.result_path(jid).read_bytes() == b"new"


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b",
        "..",
        "",
        "short",
        "x" * 65,
        "../" + "a" * 20,
        "a" * 20 + "/..",
        "/etc/passwd",
        "a" * 20 + "\x00",
        "a" * 20 + ".",
        "a" * 20 + "\n",
        "ä" * 20,
        None,
    ],
)
def test_results_refuse_bad_ids(results: DirResultStore, bad: object) -> None:
    calls = [
        lambda: results.save_graph(bad, b"{}"),  # type: ignore[arg-type]
        lambda: results.graph_paths(bad),  # type: ignore[arg-type]
        lambda: results.result_path(bad),  # type: ignore[arg-type]
        lambda: results.write_result(bad, b"x"),  # type: ignore[arg-type]
        lambda: results.result_size(bad),  # type: ignore[arg-type]
        lambda: results.open(bad),  # type: ignore[arg-type]
        lambda: results.delete(bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert list(results.root.iterdir()) == []
    assert sorted(p.name for p in results.root.parent.iterdir()) == ["results"]


def test_results_refuse_symlink_out_of_root(results: DirResultStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    jid = "a" * 32
    (results.root / jid).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        results.delete(jid)
    with pytest.raises(ValueError):
        results.write_result(jid, b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_results_delete(results: DirResultStore) -> None:
    jid, other = new_job_id(), new_job_id()
    results.save_graph(jid, b"{}", b"T")
    results.write_result(jid, b"R")
    results.write_result(other, b"R2")
    assert results.delete(jid)
    assert not (results.root / jid).exists()
    assert not results.delete(jid)
    assert results.result_path(other).read_bytes() == b"R2"
