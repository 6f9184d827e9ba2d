"""The store contracts every implementation keeps: result stores (folder, S3), queues
(in memory, PostgreSQL), and what only the production stores add (schema versions, an
unreachable database or bucket is a 503, keys hashed in PostgreSQL too)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nnglass.errors import UnavailableError
from nnglass.server.jobs import Job, JobStatus, SQLiteJobStore, new_job_id
from nnglass.server.leftovers import PARTIAL_AGE_S, sweep_partial
from nnglass.server.pg import MIGRATIONS, Database
from nnglass.server.pg_events import Listener, PgHub
from nnglass.server.pg_queue import PgQueue
from nnglass.server.pg_stores import PgJobStore, PgKeyStore, PgSmallObjects
from nnglass.server.results import RESULT_FILE, DirResultStore
from nnglass.server.s3 import SMALL_BYTES, S3ResultStore
from nnglass.server.scheduler import Scheduler, Share

# --- result stores --------------------------------------------------------------------


@pytest.fixture(params=["folder", "s3", "s3+postgresql"])
def results(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "s3":
        return S3ResultStore(request.getfixturevalue("s3").url())
    if request.param == "s3+postgresql":  # the cluster's: small graphs next to the job rows
        small = PgSmallObjects(request.getfixturevalue("pg_clean"))
        return S3ResultStore(request.getfixturevalue("s3").url(), small)
    return DirResultStore(tmp_path / "results")


def test_results_keep_graphs_and_results(results: Any) -> None:
    jid, bare = new_job_id(), new_job_id()
    results.save_graph(jid, b'{"version": "1.0"}', b"TENSORS")
    results.save_graph(bare, b"{}")
    assert results.has_graph(jid) and not results.has_graph(new_job_id())
    assert results.load_graph(jid) == (b'{"version": "1.0"}', b"TENSORS")
    assert results.load_graph(bare) == (b"{}", None)
    with pytest.raises(FileNotFoundError):
        results.load_graph(new_job_id())
    assert results.result_size(jid) is None
    with pytest.raises(FileNotFoundError):
        results.open(jid)
    results.write_result(jid, b"x" * 3000)
    assert results.result_size(jid) == 3000
    stream = results.open(jid)
    try:
        assert stream.read(1000) + stream.read() == b"x" * 3000
    finally:
        stream.close()
    assert results.delete(jid) and not results.has_graph(jid) and results.result_size(jid) is None
    assert not results.delete(jid)
    assert results.load_graph(bare) == (b"{}", None)  # another job's files untouched


def test_local_files_carry_what_a_worker_writes(results: Any) -> None:
    jid = new_job_id()
    results.save_graph(jid, b"G", b"T")
    files = results.local_files(jid)
    try:
        assert files.graph.read_bytes() == b"G"
        assert files.tensors is not None and files.tensors.read_bytes() == b"T"
        files.result.write_bytes(b"RESULT")  # what the worker does (atomically, in worker.py)
        files.commit()
    finally:
        files.close()
    assert results.result_size(jid) == 6
    with results.open(jid) as f:
        assert f.read() == b"RESULT"
    bare = new_job_id()
    results.save_graph(bare, b"G")
    files = results.local_files(bare)
    assert files.tensors is None
    files.commit()  # no result written: nothing stored
    files.close()
    assert results.result_size(bare) is None


def test_half_written_jobs_are_swept_once_old_and_nothing_else(results: Any, tmp_path: Path) -> None:
    """A job's files with no row (a submission killed before its row) go once older than
    PARTIAL_AGE_S; a job with a row keeps its files, however old; a young rowless job
    may be a submission in flight and stays."""
    with SQLiteJobStore(tmp_path / "nnglass.db") as jobs:
        kept = jobs.create(Job(key_id="k", model="m")).id
        results.save_graph(kept, b"G", b"T")
        results.write_result(kept, b"R")
        partial, bare = new_job_id(), new_job_id()
        results.save_graph(partial, b"G", b"T")
        results.write_result(partial, b"R")  # (a graph and a result: both kinds of object go)
        results.save_graph(bare, b"G")
        assert set(results.stored_before(time.time() + 5)) == {kept, partial, bare}
        assert sweep_partial(results, jobs) == []  # all young: may be in flight
        later = time.time() + PARTIAL_AGE_S + 5
        assert sorted(sweep_partial(results, jobs, now=later)) == sorted([partial, bare])
        assert not results.has_graph(partial) and not results.has_graph(bare)
        assert results.result_size(partial) is None
        assert results.load_graph(kept) == (b"G", b"T") and results.result_size(kept) == 1
        assert sweep_partial(results, jobs, now=later) == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "short", "x" * 65, "a" * 20 + "\x00", None])
def test_results_refuse_bad_ids(results: Any, bad: object) -> None:
    for call in (lambda: results.save_graph(bad, b"{}"), lambda: results.load_graph(bad),
                 lambda: results.local_files(bad), lambda: results.write_result(bad, b"x"),
                 lambda: results.result_size(bad), lambda: results.open(bad),
                 lambda: results.delete(bad), lambda: results.has_graph(bad)):
        with pytest.raises(ValueError):
            call()


def test_s3_store_creates_its_bucket_and_keeps_to_its_prefix(s3: Any) -> None:
    import boto3

    url = s3.url()
    a, b = S3ResultStore(url), S3ResultStore(url.replace("/results", "/other"))
    jid = new_job_id()
    a.write_result(jid, b"A")
    assert b.result_size(jid) is None  # same bucket, another prefix
    listed = boto3.client("s3").list_objects_v2(Bucket=a.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"results/{jid}/result.safetensors"]


def test_small_objects_live_next_to_the_rows(s3: Any, pg_clean: Database) -> None:
    """With the job store's database, a small graph or result is a row written in the
    transaction open on this thread (no S3 object; rolled back with it), a large one an S3
    object; another frontend reads both; a delete removes both."""
    url = s3.url()
    writer, other = S3ResultStore(url, PgSmallObjects(pg_clean)), S3ResultStore(url, PgSmallObjects(pg_clean))
    small, large, dropped = new_job_id(), new_job_id(), new_job_id()
    big = b"T" * SMALL_BYTES
    writer.save_graph(small, b"GRAPH", b"T")
    writer.write_result(small, b"R" * SMALL_BYTES)  # at the limit: still a row
    writer.save_graph(large, b"GRAPH", big)
    writer.write_result(large, b"R" * (SMALL_BYTES + 1))
    writer.save_graph(dropped, b"GRAPH")
    with pytest.raises(RuntimeError), pg_clean.tx():
        writer.write_result(dropped, b"R")
        raise RuntimeError("the job's COMPLETED failed to commit: its result does not stay")

    def objects(jid: str) -> list[str]:
        return [o["Key"] for o in writer.s3.list_objects_v2(Bucket=writer.bucket, Prefix=f"results/{jid}/")
                .get("Contents", [])]

    assert objects(small) == [] and objects(large) == [f"results/{large}/{o}" for o in ("graph", RESULT_FILE)]
    assert other.load_graph(small) == (b"GRAPH", b"T") and other.load_graph(large) == (b"GRAPH", big)
    assert other.open(small).read() == b"R" * SMALL_BYTES and other.result_size(large) == SMALL_BYTES + 1
    assert other.open(large).read() == b"R" * (SMALL_BYTES + 1)
    assert other.has_graph(small) and other.has_graph(dropped) and other.result_size(dropped) is None
    assert writer.delete(small) and writer.delete(large)
    for jid in (small, large):
        assert not other.has_graph(jid) and other.result_size(jid) is None and objects(jid) == []


def test_s3_store_reads_what_it_wrote_from_memory_and_others_from_storage(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two frontends on one bucket: the writer answers its own reads without a request (its
    client's GET and HEAD fail here), the other reads the same bytes from storage; a
    delete is seen by both; an object over the size limit is never remembered."""
    url = s3.url()
    writer, other = S3ResultStore(url), S3ResultStore(url)
    jid, big = new_job_id(), new_job_id()
    writer.save_graph(jid, b"GRAPH", b"T")
    writer.write_result(jid, b"R" * 5000)
    writer.recent.largest = 1000
    writer.write_result(big, b"B" * 2000)

    def no_request(**kwargs: Any) -> Any:
        raise AssertionError(f"a storage request for {kwargs.get('Key')}")

    with monkeypatch.context() as m:
        m.setattr(writer.s3, "get_object", no_request)
        m.setattr(writer.s3, "head_object", no_request)
        assert writer.load_graph(jid) == (b"GRAPH", b"T") and writer.has_graph(jid)
        assert writer.result_size(jid) == 5000 and writer.open(jid).read() == b"R" * 5000
        with pytest.raises(AssertionError, match="a storage request"):
            writer.open(big)  # too large to remember: from storage
    assert other.load_graph(jid) == (b"GRAPH", b"T") and other.open(jid).read() == b"R" * 5000
    assert writer.open(big).read() == other.open(big).read() == b"B" * 2000
    assert writer.delete(jid)
    for store in (writer, other):
        assert store.result_size(jid) is None and not store.has_graph(jid)
        with pytest.raises(FileNotFoundError):
            store.open(jid)


def test_recent_objects_stay_within_their_bytes() -> None:
    from nnglass.server.s3 import Recent

    recent = Recent(limit=10, largest=6)
    recent.put("a", b"aaaa")
    recent.put("b", b"bbbb")
    assert recent.get("a") == b"aaaa"  # now the most recently used
    recent.put("c", b"cccc")  # 12 bytes: the least recently used goes
    assert (recent.get("a"), recent.get("b"), recent.get("c"), recent.size) == (b"aaaa", None, b"cccc", 8)
    recent.put("d", b"ddddddd")  # over the largest: not kept
    assert recent.get("d") is None and recent.size == 8
    recent.forget("c")
    assert recent.get("c") is None and recent.size == 4


def test_unreachable_storage_is_unavailable(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnglass.server.s3 import S3ResultStore as Store

    store = Store(s3.url())
    from components import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UnavailableError):
        Store(s3.url())
    monkeypatch.undo()
    store.write_result("a" * 20, b"still works")
    assert store.result_size("a" * 20) == 11


# --- PostgreSQL only ------------------------------------------------------------------


def test_schema_version_and_migrations_run_once(pg_clean: Database) -> None:
    assert pg_clean.migrate() == len(MIGRATIONS)  # again: nothing to do, nothing fails
    with pg_clean.tx() as conn:
        versions = [r["version"] for r in conn.execute("SELECT version FROM nnglass_schema ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_pg_keys_stored_hashed(pg_clean: Database) -> None:
    keys = PgKeyStore(pg_clean)
    key_id, key = keys.create("alice")
    with pg_clean.tx() as conn:
        cells = [str(c) for row in conn.execute("SELECT * FROM api_keys") for c in row.values()]
    assert all(key[4:] not in c for c in cells)
    assert keys.verify(key) == key_id


def test_unreachable_database_is_unavailable() -> None:
    from components import free_port

    with pytest.raises(UnavailableError, match="cannot reach"):
        Database(f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x", timeout=0.5)


def test_a_locked_row_is_unavailable_and_writes_nothing(pg_clean: Database) -> None:
    jobs = PgJobStore(pg_clean)
    job = jobs.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
    # Another process holds the row (a migration, a backup...): a connection of its own, since
    # a tx() inside a tx() on one thread is the same transaction.
    with pg_clean.connect() as other, other.transaction():
        other.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
        with pytest.raises(UnavailableError):
            jobs.update(job.id, status=JobStatus.CANCELLED)
    assert jobs.get(job.id).status is JobStatus.QUEUED  # type: ignore[union-attr]


# --- queues ---------------------------------------------------------------------------


def _pg_queue(db: Database, models: list[str]) -> tuple[PgQueue, Listener]:
    listener = Listener(db)
    queue = PgQueue(db, listener, models)
    listener.start()
    return queue, listener


@pytest.fixture(params=["memory", "postgresql"])
def queue(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        yield Scheduler(["m", "n"])
        return
    queue, listener = _pg_queue(request.getfixturevalue("pg_clean"), ["m", "n"])
    yield queue
    queue.close()
    listener.close()


def test_queue_is_fair_across_keys_and_in_order_within_one(queue: Any) -> None:
    for key, job in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        queue.submit("m", key, job)
    queue.submit("n", "a", "other-model")
    assert list(queue.positions("m")) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert queue.depth("m") == 6 and queue.queued_by("a") == 4
    assert queue.next("m", timeout=1) == "a1"
    queue.submit("m", "d", "d1")  # a new key gets its turn in this round
    assert queue.cancel("m", "c1") and not queue.cancel("m", "c1")
    taken = [queue.next("m", timeout=1) for _ in range(5)]
    assert taken == ["b1", "d1", "a2", "b2", "a3"]  # a newcomer goes before the key just served
    assert queue.next("m", timeout=0.2) is None
    assert queue.next("n", timeout=1) == "other-model"


def test_fairness_is_counted_in_tokens_not_jobs(queue: Any) -> None:
    """A key whose jobs are long is served as many tokens as a key of short jobs, and a key
    arriving with one job behind 100 long ones starts after at most one of them (on both
    queues: the in-memory Scheduler and PostgreSQL's)."""
    for i in range(100):
        queue.submit("m", "heavy", f"h{i}", cost=1000)
    assert queue.next("m", timeout=1) == "h0"
    queue.submit("m", "light", "l0", cost=10)
    assert queue.positions("m")["l0"] == 0
    for i in range(1, 101):
        queue.submit("m", "light", f"l{i}", cost=10)
    assert list(queue.positions("m"))[99:103] == ["l99", "h1", "l100", "h2"]
    order = [queue.next("m", timeout=1) for _ in range(103)]
    assert order[:100] == [f"l{i}" for i in range(100)]  # 1000 tokens: level with heavy's 1000
    assert order[100:] == ["h1", "l100", "h2"]


def test_an_idle_queue_starts_everyone_level(queue: Any) -> None:
    """Tokens served while a queue was busy are forgotten once nobody waits."""
    for i in range(3):
        queue.submit("m", "a", f"a{i}", cost=100)
    assert [queue.next("m", timeout=1) for _ in range(3)] == ["a0", "a1", "a2"]
    queue.submit("m", "a", "a3", cost=100)  # the queue was empty: a's 300 tokens are gone
    queue.submit("m", "b", "b0", cost=1)
    queue.submit("m", "b", "b1", cost=1)
    assert list(queue.positions("m")) == ["a3", "b0", "b1"]


def test_a_released_job_is_queued_again_for_anyone(queue: Any) -> None:
    job = Job(key_id="k", model="m", status=JobStatus.QUEUED)
    queue.submit("m", "k", job.id)
    assert queue.next("m", timeout=1) == job.id and queue.next("m", timeout=0.2) is None
    queue.release(job)  # its replica's worker died meanwhile
    assert queue.depth("m") == 1 and queue.next("m", timeout=1) == job.id


def test_a_skipped_share_key_waits_while_other_keys_are_served(queue: Any) -> None:
    """`next(skip=prefix)` (a full generation batch): keys whose next job's share key
    starts with it wait, the others are served as ever; within a key, order holds."""
    queue.submit("m", "a", "g1", share=Share("generate\nm", 1, 4))
    queue.submit("m", "a", "t1", share=Share("trace", 1, 4))  # behind a's generation
    queue.submit("m", "b", "t2", share=Share("trace", 1, 4))
    queue.submit("m", "c", "t3")
    assert [queue.next("m", timeout=0.2, skip="generate\n") for _ in range(3)] == ["t2", "t3", None]
    assert [queue.next("m", timeout=1) for _ in range(2)] == ["g1", "t1"]


def test_queue_shares_only_matching_jobs(queue: Any) -> None:
    for i, key in enumerate(["x", "y", "x", "x", None]):
        queue.submit("m", f"k{i % 2}", f"j{i}", share=None if key is None else Share(key, 1, 4))
    assert queue.next("m", timeout=1) == "j0"
    assert queue.take_sharing("m", "j0", limit=1) == ["j2"]
    assert queue.take_sharing("m", "j4", limit=5) == []
    order = list(queue.positions("m"))  # k0 was served twice: k1 goes first (and, counted in
    assert order[0] == "j1" and sorted(order) == ["j1", "j3", "j4"]  # tokens, again next)


def _until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.01)


def test_a_drained_queue_looks_again_on_word_of_a_job_or_at_its_poll(pg_clean: Database) -> None:
    """Once a claim leaves nothing waiting, `next` makes no claim (no transaction) until a
    job is announced (here by another frontend's NOTIFY), or its poll comes round (a job no
    NOTIFY announced); a replica of another model is not woken by this model's jobs."""
    a, la = _pg_queue(pg_clean, ["m", "n"])
    b, lb = _pg_queue(pg_clean, ["m"])
    me = threading.current_thread().name
    try:
        a.submit("m", "k", "j1")
        assert a.next("m", timeout=1) == "j1"  # the last one waiting
        before = pg_clean.transactions[me]
        assert a.next("m", timeout=0) is None and pg_clean.transactions[me] == before
        b.submit("m", "k", "j2")
        assert a.next("m", timeout=10) == "j2"
        with pg_clean.tx() as conn:  # queued with no NOTIFY (as if it were lost)
            conn.execute("INSERT INTO queue (job_id, model, key_id) VALUES ('j3', 'm', 'k')")
        assert a.next("m", timeout=0) is None
        assert a.next("m", timeout=5) == "j3"  # the poll

        def wait_for_n() -> None:
            assert a.next("n", timeout=0.4) is None

        waiter = threading.Thread(target=wait_for_n, name="replica-of-n")
        waiter.start()
        for i in range(5):  # jobs of m meanwhile, from here and from another frontend
            (a if i % 2 else b).submit("m", "k", f"m{i}")
        waiter.join()
        assert pg_clean.transactions["replica-of-n"] == 2  # its first look, and its last
    finally:
        for x in (a, la, b, lb):
            x.close()


def test_a_frontend_hears_each_change_once(pg_clean: Database) -> None:
    """A hub tells its own waiters of what it publishes at the commit (before any NOTIFY
    comes back) and skips its own NOTIFY when it does; another frontend's changes it
    delivers as they arrive, to its waiters and to its observers (which look for a cancel
    made elsewhere: never called for the hub's own changes)."""
    hubs, listeners, observed = [], [], []
    for _ in range(2):
        listener = Listener(pg_clean)
        hub, heard = PgHub(pg_clean, listener), []
        hub.observe(heard.append)
        listener.start()
        hubs.append(hub)
        listeners.append(listener)
        observed.append(heard)
    a, b = hubs

    async def until(job: str, heard: list[str]) -> None:
        deadline = time.monotonic() + 10
        while job not in heard:
            assert time.monotonic() < deadline, f"{job} never arrived"
            await asyncio.sleep(0.01)

    async def follow() -> None:
        with a.listen_all() as changes:
            a.publish("job-a")
            assert changes.take() == {"job-a"}  # at its commit
            b.publish_many(["job-b", "job-c"])
            # A listener delivers in commit order: once a has b's later NOTIFY it has met
            # (and skipped) its own earlier one.
            await until("job-c", observed[0])
            a.publish("job-d")
            b.publish("job-e")
            await until("job-e", observed[0])
            assert changes.take() == {"job-b", "job-c", "job-d", "job-e"}  # job-a's NOTIFY skipped

    try:
        asyncio.run(follow())
        asyncio.run(until("job-d", observed[1]))
        assert observed[0] == ["job-b", "job-c", "job-e"]
        assert sorted(observed[1]) == ["job-a", "job-d"]
    finally:
        for hub in hubs:
            hub.relay.close()
        for listener in listeners:
            listener.close()


def test_two_frontends_never_take_one_job(pg_clean: Database) -> None:
    a, la = _pg_queue(pg_clean, ["m"])
    b, lb = _pg_queue(pg_clean, ["m"])
    try:
        jobs = [f"job{i:03d}" for i in range(60)]
        for i, job in enumerate(jobs):
            (a if i % 2 else b).submit("m", f"key{i % 5}", job)
        taken: list[str] = []
        lock = threading.Lock()

        def drain(q: PgQueue) -> None:
            while (job := q.next("m", timeout=0.3)) is not None:
                with lock:
                    taken.append(job)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(drain, [a, b, a, b, a, b]))
        assert sorted(taken) == jobs  # each exactly once
    finally:
        for x in (a, la, b, lb):
            x.close()


def test_a_dead_frontends_jobs_are_orphans_once(pg_clean: Database) -> None:
    jobs = PgJobStore(pg_clean)
    dead, ld = _pg_queue(pg_clean, ["m"])
    alive, la = _pg_queue(pg_clean, ["m"])
    try:
        running = jobs.create(Job(key_id="k", model="m", status=JobStatus.RUNNING, attempts=1))
        waiting = jobs.create(Job(key_id="k", model="m", status=JobStatus.QUEUED))
        mine = jobs.create(Job(key_id="k", model="m", status=JobStatus.RUNNING))
        for job in (running, waiting, mine):
            dead.submit("m", "k", job.id)
        assert dead.next("m", timeout=1) == running.id
        alive_job = alive.next("m", timeout=1)
        assert alive_job == waiting.id
        assert alive.orphans(jobs.unfinished) == []  # both frontends live: nothing is an orphan
        with pg_clean.tx() as conn:  # the dead one stops renewing its lease
            stale = "UPDATE frontends SET heartbeat = now() - interval '1 hour' WHERE id = %s"
            conn.execute(stale, (dead.id,))
        orphans = alive.orphans(jobs.unfinished)
        assert [j.id for j in orphans] == [running.id]
        assert orphans[0].attempts == 1
        assert alive.orphans(jobs.unfinished) == []  # handed out once; the service re-queues it
        assert list(alive.positions("m")) == [mine.id]
    finally:
        for x in (dead, ld, alive, la):
            x.close()


def test_quota_hold_is_one_step_across_frontends(pg_clean: Database) -> None:
    a, la = _pg_queue(pg_clean, ["m"])
    b, lb = _pg_queue(pg_clean, ["m"])
    limit, admitted = 3, []

    def submit(i: int) -> None:
        q = a if i % 2 else b
        with q.hold("k"):
            if q.queued_by("k") < limit:
                q.submit("m", "k", f"j{i}")
                admitted.append(i)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(16)))
        assert len(admitted) == limit and a.queued_by("k") == limit
    finally:
        for x in (a, la, b, lb):
            x.close()


# --- configuration and the CLI ----------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "named"), [
    ("database", "mysql://x/y", "server.database"), ("database", "/var/nnglass.db", "server.database"),
    ("results", "gs://bucket/x", "server.results")])
def test_config_refuses_stores_it_does_not_know(key: str, value: str, named: str) -> None:
    from nnglass.errors import ConfigError
    from nnglass.server.config import parse_config

    models = [{"name": "m", "source": "m"}]
    with pytest.raises(ConfigError, match=named):
        parse_config({"server": {key: value}, "models": models})


def test_cli_keys_reach_the_configured_database(postgres: Any, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    url = postgres.fresh_database()
    config = tmp_path / "server.toml"
    models = '[[models]]\nname = "m"\nsource = "m"\n'
    config.write_text(f'[server]\nhome = "{tmp_path}"\ndatabase = "{url}"\n{models}')

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "nnglass", "keys", *args, "--config", str(config)],
                              capture_output=True, text=True, env=os.environ, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    key = cli("create", "carol").split()[-1]
    db = Database(url)
    try:
        keys = PgKeyStore(db)
        assert keys.verify(key) is not None
        assert "carol" in cli("list") and key not in cli("list")
        cli("revoke", "carol")
        assert keys.verify(key) is None
    finally:
        db.close()
    assert not (tmp_path / "nnglass.db").exists()  # nothing went to SQLite
