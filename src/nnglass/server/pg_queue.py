"""The job queue in PostgreSQL, shared by every frontend (the `scheduler.Queue` seam).

Invariants:
- A job waits as a `queue` row (model, key, co-tenancy share key, `pos` from one
  sequence) with `claimed_by` NULL. A frontend takes one with `SELECT ... FOR UPDATE
  SKIP LOCKED` and marks it its own in the same transaction, so two frontends never
  take one job; the row stays, claimed, until the job is terminal (then a sweep drops
  it) or cancelled.
- Fairness as `scheduler.Scheduler` (start-time fair queueing in tokens), across
  frontends: the next job is the oldest of the waiting key served the fewest tokens
  (`queue_turns.tokens`; a job's `cost` as the service gives it). A key that starts
  waiting again starts level with the key served last before it (`queue_clock`: no credit
  banked while idle); a queue nobody waits in starts everyone level. Ties go to the key
  whose place in line is earliest: the later of its oldest waiting job and the last time
  it was served (`queue_turns.served`, from the same sequence as `pos`); within a key,
  submission order. Whatever reads or charges the tokens (a submit, a claim, a shared
  pass's takes) holds the model's advisory lock for its transaction, so frontends
  charge one after another (and never deadlock on the rows).
- An idle replica waits for word of a job of its model (`_POLL_S` at most): a NOTIFY
  from another frontend, or this frontend's own commit of one (`Database.after_commit`;
  its NOTIFY, named by `self.id`, is skipped when it comes back). One that lands while
  its claim looks is never waited past (a count per model, read before the claim);
  another model's replicas sleep on. A claim that leaves none waiting marks the model
  drained at the count it read: the next `next` waits for word before it looks again (no
  claim after each job, or at each generation step, that can only find nothing), and
  looks anyway after `_POLL_S`, for a job no note announced (a lost NOTIFY).
- Each frontend renews its lease (`frontends.heartbeat`, the database's clock) every
  `tick`; a frontend silent for `LEASE_S` is dead. `orphans` hands back, once, the
  unfinished jobs that no live frontend holds (claimed by a dead one, or with no row
  at all for `GRACE_S`), with their rows removed so nobody takes them meanwhile; the
  service then re-queues or fails each with a reason. One sweep at a time (an
  advisory lock). A frontend that stops cleanly gives up its lease at once.
- A frontend whose own lease lapsed (a database outage longer than `LEASE_S`) may see
  a job it still runs run again elsewhere: the first terminal status wins (jobs.py).
- `next(..., skip=prefix)` claims as above among the keys whose next waiting job's share
  key does not start with `prefix` (scheduler.py's rule).
- A job claimed when no other job of its model waited, or one that shares with nothing,
  is taken alone: `take_sharing` answers [] without asking the database (a job queued
  in the milliseconds between joins the next pass instead).
- `hold(key_id)` is a transaction-scoped advisory lock on the key: the quota check and
  the queueing are one step across frontends.
- A read or write that is one statement is its own transaction (`Database.statement()`:
  one round trip, not three).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UnavailableError
from .jobs import _TERMINAL_SQL, Job
from .pg import Database
from .pg_events import QUEUE_CHANNEL, Listener
from .pg_stores import _job
from .scheduler import Share

__all__ = ["PgQueue"]

LEASE_S = 10.0  # a frontend silent this long is dead
GRACE_S = 5.0  # a job row this young may still be on its way into the queue
_SWEEP_LOCK = 0x6E6E68
_MODEL_LOCK = "SELECT pg_advisory_xact_lock(7237233, hashtext(%(model)s))"  # (class "nnq", model)
_POLL_S = 0.5  # how often an idle replica looks again, notifications aside

# A model's lanes (keys with waiting jobs): the tokens each was served (a key with no row
# yet: the clock), and its place among equals.
_LANES = """
lanes AS (SELECT w.key_id, COALESCE(MAX(t.tokens), (SELECT clock FROM c)) AS level,
                 GREATEST(MIN(w.pos), COALESCE(MAX(t.served), 0)) AS place
          FROM w LEFT JOIN queue_turns t ON t.model = %(model)s AND t.key_id = w.key_id GROUP BY w.key_id)
"""
_WAITING = """
WITH c AS (SELECT COALESCE(MAX(clock), 0) AS clock FROM queue_clock WHERE model = %(model)s),
w AS (SELECT job_id, key_id, share, pos, cost FROM queue WHERE model = %(model)s AND claimed_by IS NULL),
"""
# The waiting jobs of one model in the order they start: each by the tokens its lane will
# have been served when it starts, then its round, then its lane's place.
_ORDER = _WAITING + _LANES + """
SELECT w.job_id, w.key_id, w.share, w.cost FROM w JOIN lanes l ON l.key_id = w.key_id
ORDER BY l.level + SUM(w.cost) OVER (PARTITION BY w.key_id ORDER BY w.pos) - w.cost,
         row_number() OVER (PARTITION BY w.key_id ORDER BY w.pos), l.place
"""
_CLAIM = _WAITING + _LANES + """
SELECT q.job_id, q.key_id, q.cost, q.share, (SELECT count(*) FROM w) AS waiting
FROM queue q JOIN lanes l ON l.key_id = q.key_id
WHERE q.model = %(model)s AND q.claimed_by IS NULL
ORDER BY l.level, l.place, q.pos LIMIT 1 FOR UPDATE OF q SKIP LOCKED
"""
# As _CLAIM among the lanes whose next job's share key does not start with %(skip)s.
_CLAIM_SKIP = _WAITING + _LANES + """
SELECT q.job_id, q.key_id, q.cost, q.share, (SELECT count(*) FROM w) AS waiting
FROM queue q JOIN lanes l ON l.key_id = q.key_id
WHERE q.model = %(model)s AND q.claimed_by IS NULL
  AND q.pos = (SELECT MIN(pos) FROM w WHERE w.key_id = q.key_id)
  AND (q.share IS NULL OR NOT starts_with(q.share::json->>0, %(skip)s))
ORDER BY l.level, l.place, q.pos LIMIT 1 FOR UPDATE OF q SKIP LOCKED
"""
# A job of `key` starts: the key is charged its cost, and the clock is what it had before.
_CHARGE = """
WITH c AS (SELECT COALESCE(MAX(clock), 0) AS clock FROM queue_clock WHERE model = %(model)s),
t AS (INSERT INTO queue_turns AS t (model, key_id, served, tokens)
      SELECT %(model)s, %(key)s, nextval('queue_order'), c.clock + %(cost)s FROM c
      ON CONFLICT (model, key_id) DO UPDATE SET served = EXCLUDED.served, tokens = t.tokens + %(cost)s
      RETURNING t.tokens - %(cost)s AS level)
INSERT INTO queue_clock (model, clock) SELECT %(model)s, level FROM t
ON CONFLICT (model) DO UPDATE SET clock = EXCLUDED.clock
"""
# Before a job joins: a queue nobody waits in starts everyone level; a key that was not
# waiting starts level with the clock (never below what it was served).
_RESET = """
WITH idle AS (SELECT NOT EXISTS (SELECT 1 FROM queue WHERE model = %(model)s AND claimed_by IS NULL) AS yes),
gone AS (DELETE FROM queue_turns WHERE model = %(model)s AND (SELECT yes FROM idle))
DELETE FROM queue_clock WHERE model = %(model)s AND (SELECT yes FROM idle)
"""
_JOIN = """
INSERT INTO queue_turns AS t (model, key_id, served, tokens)
SELECT %(model)s, %(key)s, 0, (SELECT COALESCE(MAX(clock), 0) FROM queue_clock WHERE model = %(model)s)
WHERE NOT EXISTS (SELECT 1 FROM queue WHERE model = %(model)s AND key_id = %(key)s AND claimed_by IS NULL)
ON CONFLICT (model, key_id) DO UPDATE SET tokens = GREATEST(t.tokens, EXCLUDED.tokens)
"""
_ORPHANS = f"""
SELECT j.* FROM jobs j
LEFT JOIN queue q ON q.job_id = j.id
LEFT JOIN frontends f ON f.id = q.claimed_by AND f.heartbeat > now() - make_interval(secs => %(lease)s)
WHERE j.status NOT IN ({_TERMINAL_SQL})
  AND ((q.job_id IS NULL AND j.created_at < extract(epoch FROM now()) - %(grace)s)
       OR (q.claimed_by IS NOT NULL AND f.id IS NULL))
ORDER BY j.seq
"""


class PgQueue:
    """Per-model fair queues in the database; this frontend is `self.id`."""

    def __init__(self, db: Database, listener: Listener, models: list[str]) -> None:
        self.db, self.models = db, list(models)
        self.id = "fe_" + secrets.token_hex(8)
        self._wake = threading.Condition()
        # Per model, the jobs queued so far (a NOTIFY from elsewhere, or a commit here): one
        # that lands during a claim is not waited past.
        self._notes = dict.fromkeys(self.models, 0)
        self._drained: dict[str, int] = {}  # model -> its notes when a claim left none waiting
        self._closed = False
        self._alone: set[str] = set()  # claimed here when no other job waited, or sharing nothing
        listener.on(QUEUE_CHANNEL, self._arrived)
        self.tick()

    def _arrived(self, payload: str) -> None:
        origin, _, model = payload.partition(" ")
        if origin != self.id:  # this frontend's own woke its replicas at their commit
            self._queued(model)

    def _queued(self, model: str) -> None:
        """A job of `model` is waiting: its replicas here look (another model's sleep on)."""
        with self._wake:
            if model in self._notes:
                self._notes[model] += 1
                self._wake.notify_all()

    def _notify(self, conn: Any, model: str) -> None:
        """Tell every frontend a job of `model` waits: others by a NOTIFY, sent at commit;
        this one's replicas as soon as it has committed."""
        conn.execute("SELECT pg_notify(%s, %s)", (QUEUE_CHANNEL, f"{self.id} {model}"))
        self.db.after_commit(lambda: self._queued(model))

    def submit(self, model: str, key_id: str, job_id: str, share: Share | None = None,
               cost: int = 1) -> None:
        """Queue a job that costs `cost` tokens (see the fairness invariant above)."""
        shared = None if share is None else json.dumps([share.key, share.rows, share.width])
        where = {"model": model, "key": key_id}
        with self.db.tx() as conn:
            conn.execute(_MODEL_LOCK, where)
            conn.execute(_RESET, where)
            conn.execute(_JOIN, where)
            conn.execute(
                "INSERT INTO queue (job_id, model, key_id, share, cost) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (job_id) DO NOTHING",
                (job_id, model, key_id, shared, max(int(cost), 1)),
            )
            self._notify(conn, model)

    def _claim(self, model: str, skip: str | None, seen: int) -> str | None:
        """The next job, claimed; `seen`: the model's notes before it looked."""
        with self.db.tx() as conn:
            conn.execute(_MODEL_LOCK, {"model": model})
            sql = _CLAIM if skip is None else _CLAIM_SKIP
            row = conn.execute(sql, {"model": model, "skip": skip}).fetchone()
            if row is None:
                if skip is None:
                    self._drained[model] = seen
                return None
            conn.execute("UPDATE queue SET claimed_by = %s WHERE job_id = %s", (self.id, row["job_id"]))
            conn.execute(_CHARGE, {"model": model, "key": row["key_id"], "cost": row["cost"]})
            if row["waiting"] <= 1:
                self._drained[model] = seen
            else:
                self._drained.pop(model, None)
            if row["share"] is None or row["waiting"] <= 1:
                self._alone.add(str(row["job_id"]))  # nothing to share with: `take_sharing` asks nobody
            return str(row["job_id"])

    def next(self, model: str, timeout: float | None = None, skip: str | None = None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:  # drained, and no word of a job since: nothing to look for until one comes
            look = model not in self._notes or self._drained.get(model) != self._notes[model]
        while not self._closed:
            with self._wake:
                seen = self._notes.get(model, 0)
            job_id = None
            try:
                job_id = self._claim(model, skip, seen) if look else None
            except UnavailableError:  # the replica waits it out, like an empty queue
                pass
            if job_id is not None:
                return job_id
            look = True  # after a wait: a note, or the poll that finds what no note announced
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return None
            with self._wake:  # (a job that came while this claim looked: no wait)
                self._wake.wait_for(lambda seen=seen: self._notes.get(model, 0) != seen or self._closed, left)
        return None

    def take_sharing(self, model: str, job_id: str, limit: int, tokens: int | None = None,
                     wait: float = 0.0) -> list[str]:
        """As `Scheduler.take_sharing`, within `limit` jobs and `tokens` padded tokens, from
        the jobs queued now (no wait window across frontends yet)."""
        if job_id in self._alone:
            self._alone.discard(job_id)
            return []
        if limit <= 0:
            return []
        try:
            return self._take_sharing(model, job_id, limit, tokens)
        except UnavailableError:  # nothing taken (rolled back): the job runs alone
            return []

    def _take_sharing(self, model: str, job_id: str, limit: int, tokens: int | None) -> list[str]:
        with self.db.tx() as conn:
            conn.execute(_MODEL_LOCK, {"model": model})
            row = conn.execute("SELECT share FROM queue WHERE job_id = %s", (job_id,)).fetchone()
            if row is None or row["share"] is None:
                return []
            key, rows, width = json.loads(row["share"])
            order = []
            for r in conn.execute(_ORDER, {"model": model}).fetchall():
                if r["share"] is None or len(order) >= limit:
                    continue
                k, n, w = json.loads(r["share"])
                if k == key and (tokens is None or (rows + n) * max(width, w) <= tokens):
                    order.append(r)
                    rows, width = rows + n, max(width, w)
            wanted = [r["job_id"] for r in order]
            got = {
                r["job_id"]
                for r in conn.execute(
                    "UPDATE queue SET claimed_by = %s WHERE job_id = ANY(%s) AND claimed_by IS NULL "
                    "RETURNING job_id",
                    (self.id, wanted),
                ).fetchall()
            }
            for r in order:
                if r["job_id"] in got:
                    conn.execute(_CHARGE, {"model": model, "key": r["key_id"], "cost": r["cost"]})
        return [j for j in wanted if j in got]

    def release(self, job: Job) -> None:
        """A job this frontend claimed and could not run: unclaimed, for any frontend."""
        self._alone.discard(job.id)
        with self.db.tx() as conn:
            conn.execute("UPDATE queue SET claimed_by = NULL WHERE job_id = %s AND claimed_by = %s",
                         (job.id, self.id))
            self._notify(conn, job.model)

    def cancel(self, model: str, job_id: str) -> bool:
        with self.db.statement() as conn:
            sql = "DELETE FROM queue WHERE job_id = %s AND claimed_by IS NULL RETURNING job_id"
            return conn.execute(sql, (job_id,)).fetchone() is not None

    def positions(self, model: str) -> dict[str, int]:
        with self.db.statement() as conn:
            return {r["job_id"]: i for i, r in enumerate(conn.execute(_ORDER, {"model": model}).fetchall())}

    def depth(self, model: str) -> int:
        with self.db.statement() as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM queue WHERE model = %s AND claimed_by IS NULL", (model,)
            ).fetchone()
        return int(row["n"])

    def queued_by(self, key_id: str) -> int:
        with self.db.statement() as conn:
            row = conn.execute(
                "SELECT count(*) AS n FROM queue WHERE key_id = %s AND claimed_by IS NULL", (key_id,)
            ).fetchone()
        return int(row["n"])

    @contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        with self.db.tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key_id,))
            yield

    def tick(self) -> None:
        """Renew this frontend's lease; drop the rows of jobs that have ended."""
        with self.db.tx() as conn:
            conn.execute(
                "INSERT INTO frontends (id, heartbeat) VALUES (%s, now()) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat = now()",
                (self.id,),
            )
            conn.execute(
                f"DELETE FROM queue q USING jobs j WHERE q.job_id = j.id AND j.status IN ({_TERMINAL_SQL})"
            )

    def orphans(self, unfinished: Callable[[], list[Job]]) -> list[Job]:
        with self.db.tx() as conn:
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (_SWEEP_LOCK,)).fetchone()[
                "ok"
            ]:
                return []  # another frontend sweeps now
            rows: list[dict[str, Any]] = conn.execute(
                _ORPHANS, {"lease": LEASE_S, "grace": GRACE_S}
            ).fetchall()
            conn.execute("DELETE FROM queue WHERE job_id = ANY(%s)", ([r["id"] for r in rows],))
            conn.execute(
                "DELETE FROM frontends WHERE heartbeat < now() - make_interval(secs => %s)", (LEASE_S * 10,)
            )
        return [_job(r) for r in rows]

    def close(self) -> None:
        """Stop waiting; give up the lease, so the others take over this frontend's jobs now."""
        self._closed = True
        with self._wake:
            self._wake.notify_all()
        try:
            with self.db.tx() as conn:
                given = conn.execute(
                    "UPDATE queue SET claimed_by = NULL WHERE claimed_by = %s AND job_id IN "
                    "(SELECT id FROM jobs WHERE status = 'QUEUED') RETURNING model",
                    (self.id,),
                ).fetchall()
                for model in {r["model"] for r in given}:
                    self._notify(conn, model)
                conn.execute("DELETE FROM frontends WHERE id = %s", (self.id,))
        except Exception:  # the database is gone too: the lease lapses on its own
            pass
