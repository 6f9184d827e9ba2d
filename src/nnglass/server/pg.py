"""The PostgreSQL database the stores share when `[server] database = "postgresql://..."`.

Invariants:
- One `Database` (a psycopg_pool connection pool) per process, shared by the job store,
  the key store and the queue; every statement borrows a connection for one
  transaction (`db.tx()`), commits on success and rolls back on any error.
- The schema is created or migrated on open: `nnglass_schema` holds the version, and
  each migration runs once, in order, under an advisory lock, so frontends that start
  together never race on it.
- A database that cannot be reached, or a connection not free within `timeout`
  seconds, or a statement that waits on a lock longer than that, is an
  `UnavailableError` (HTTP 503 + Retry-After), like a locked SQLite file (db.py);
  every other error is left as it is. Nothing half-written: a failed transaction is
  rolled back whole.
- Once the database is back, requests answer again within about `2 * timeout`
  seconds, however long it was away: a pooled connection idle for `FRESH_S` or more is
  checked before it is lent (an idle one died with the outage; one that committed a
  moment ago is lent as it is, saving a round trip per transaction: should it have died
  since, its transaction fails as any would in an outage, and the pool drops it), and
  the pool gives up a reconnection after
  `2 * timeout` rather than keep its doubling backoff, which after a long outage would
  wait about as long again; the next request then connects afresh.
- Pooled connections are in autocommit: `tx()` is BEGIN..COMMIT around its block, and
  `statement()` lends a connection for one statement, its own transaction in one round
  trip where a `tx()` of it costs three (BEGIN, it, COMMIT): reads and writes that are
  one statement (a key check, a job's row, a status change) use it. (psycopg's pipeline
  mode, which would send a transaction's statements without waiting, cost more CPU and
  more time than the round trips it saves against a PostgreSQL on the same machine:
  not used.) Writes say what they changed with `RETURNING`, never `rowcount`.
- A `tx()` opened inside another on the same thread is that same transaction (one
  connection, one commit): callers group what must happen together, or what is cheaper
  as one round of BEGIN..COMMIT (a job's row, its queue row and its NOTIFY), by opening
  an outer `tx()`; an error anywhere in it rolls all of it back, so nothing inside may
  catch a database error and go on writing (retries wrap the outer block).
- `after_commit(call)` runs `call` in the committing thread once the open transaction
  has committed (never after a rollback): what a NOTIFY tells other processes, this one
  learns then, without the NOTIFY's round trip.
- `transactions` counts the transactions begun (outer ones only, `statement()`s too) by thread name, for
  tests that pin how many a job makes (tests/server/test_pg_transactions.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import UnavailableError

__all__ = ["MIGRATIONS", "Database"]

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0  # as db.BUSY_TIMEOUT_S: a request behind an unreachable database answers promptly
FRESH_S = 1.0  # a connection that committed this recently is lent unchecked
_MIGRATE_LOCK = 0x6E6E67  # "nng": the advisory lock migrations run under

# Each entry moves the schema one version up; never edit one that has shipped, append.
MIGRATIONS: list[str] = [
    # 1: jobs, keys, the shared queue and the frontends' leases
    """
    CREATE TABLE jobs (
        seq          BIGSERIAL PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        key_id       TEXT NOT NULL,
        model        TEXT NOT NULL,
        status       TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        queued_at    DOUBLE PRECISION,
        started_at   DOUBLE PRECISION,
        finished_at  DOUBLE PRECISION,
        expires_at   DOUBLE PRECISION,
        error        TEXT,
        result_bytes BIGINT,
        attempts     INTEGER NOT NULL DEFAULT 0,
        mode         TEXT NOT NULL
    );
    CREATE INDEX jobs_status_model ON jobs(status, model, seq);
    CREATE INDEX jobs_expires ON jobs(expires_at);
    CREATE INDEX jobs_key ON jobs(key_id, seq);
    CREATE TABLE api_keys (
        id      TEXT PRIMARY KEY,
        name    TEXT NOT NULL,
        hash    TEXT NOT NULL UNIQUE,
        created DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION
    );
    CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked IS NULL;
    CREATE SEQUENCE queue_order;
    CREATE TABLE queue (
        job_id     TEXT PRIMARY KEY,
        model      TEXT NOT NULL,
        key_id     TEXT NOT NULL,
        share      TEXT,
        pos        BIGINT NOT NULL DEFAULT nextval('queue_order'),
        claimed_by TEXT
    );
    CREATE INDEX queue_model ON queue(model, claimed_by, pos);
    CREATE TABLE queue_turns (
        model  TEXT NOT NULL,
        key_id TEXT NOT NULL,
        served BIGINT NOT NULL,
        PRIMARY KEY (model, key_id)
    );
    CREATE TABLE frontends (
        id        TEXT PRIMARY KEY,
        heartbeat TIMESTAMPTZ NOT NULL
    );
    """,
    # 2: fairness in tokens (pg_queue.py): a job's cost, the tokens each key was served, the
    # level of the key served last (old rows: everyone level, as after an idle queue)
    """
    ALTER TABLE queue ADD COLUMN cost BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE queue_turns ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE queue_clock (
        model TEXT PRIMARY KEY,
        clock BIGINT NOT NULL
    );
    """,
    # 3: small graphs inline, next to their job's row (pg_stores.PgSmallObjects, s3.py)
    """
    CREATE TABLE small_objects (
        job_id TEXT NOT NULL,
        name   TEXT NOT NULL,
        data   BYTEA NOT NULL,
        written DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM now()),
        PRIMARY KEY (job_id, name)
    );
    """,
]


class Database:
    """A connection pool to `url`, the schema brought up to date on open."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S, max_size: int = 16) -> None:
        self.url, self.timeout = url, timeout
        self.transactions: Counter[str] = Counter()  # thread name -> transactions it began
        self._counting = threading.Lock()
        self._open = threading.local()  # this thread's transaction, while one is open
        options = f"-c lock_timeout={int(timeout * 1000)} -c statement_timeout={int(timeout * 5000)}"
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            check=_check_unless_fresh,
            reconnect_timeout=2 * timeout,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row, "options": options,
                    "connect_timeout": max(1, int(timeout))},
        )
        try:
            self.pool.open(wait=True, timeout=timeout * 5)
        except PoolTimeout:
            self.pool.close()
            raise UnavailableError(f"cannot reach the database at {_redact(url)}") from None
        self.migrate()

    @contextmanager
    def tx(self) -> Iterator[psycopg.Connection]:
        """A connection in a transaction: committed on success, rolled back on error; an
        unreachable or locked database is UnavailableError. Inside another `tx()` on
        this thread: the same connection and transaction."""
        outer = getattr(self._open, "conn", None)
        if outer is not None:
            yield outer
            return
        self._count()
        after: list[Callable[[], None]] = []
        with self._borrowed() as conn, conn.transaction():  # BEGIN .. COMMIT, or ROLLBACK
            self._open.conn, self._open.after = conn, after
            try:
                yield conn
            finally:
                self._open.conn = None
        for call in after:  # committed
            try:
                call()
            except Exception:  # a waker's defect: the transaction stands, its caller goes on
                log.exception("after-commit call %r failed", call)

    @contextmanager
    def statement(self) -> Iterator[psycopg.Connection]:
        """A connection for ONE statement, which is its own transaction (autocommit: one
        round trip, where `tx()` adds a BEGIN's and a COMMIT's); inside a `tx()` on this
        thread, that transaction's. Never more than one statement: two would each commit
        alone. No `after_commit` inside (there is no commit to wait for)."""
        outer = getattr(self._open, "conn", None)
        if outer is not None:
            yield outer
            return
        self._count()
        with self._borrowed() as conn:
            yield conn

    def _count(self) -> None:
        with self._counting:
            self.transactions[threading.current_thread().name] += 1

    @contextmanager
    def _borrowed(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (autocommit: `tx()` opens its transaction itself), its
        failures as UnavailableError (see the invariants)."""
        try:
            with self.pool.connection() as conn:
                yield conn
                conn._nnglass_used = time.monotonic()  # type: ignore[attr-defined]  # (see FRESH_S)
        except PoolTimeout:
            raise UnavailableError(
                "the server's database is busy or unreachable; try again in a few seconds"
            ) from None
        except (psycopg.OperationalError, psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as e:
            raise UnavailableError(
                f"the server's database is unavailable ({type(e).__name__}); try again in a few seconds"
            ) from None

    def after_commit(self, call: Callable[[], None]) -> None:
        """`call()` once the transaction open on this thread has committed, never if it rolls
        back (this process's own waiters learn of a change at once, not when its NOTIFY comes
        back); now if none is open."""
        if getattr(self._open, "conn", None) is None:
            call()
            return
        self._open.after.append(call)

    def migrate(self) -> int:
        """Run the migrations not yet applied; the version now."""
        with self.tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS nnglass_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) AS v FROM nnglass_schema").fetchone()
            version = (row or {}).get("v") or 0
            for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(sql)
                conn.execute("INSERT INTO nnglass_schema (version) VALUES (%s)", (number,))
            return len(MIGRATIONS)

    def connect(self) -> psycopg.Connection:
        """A connection of its own, outside the pool, in autocommit (for LISTEN)."""
        return psycopg.connect(
            self.url, autocommit=True, row_factory=dict_row, connect_timeout=max(1, int(self.timeout))
        )

    def close(self) -> None:
        self.pool.close()


def _check_unless_fresh(conn: psycopg.Connection) -> None:
    """The pool's check before lending `conn`: a round trip, unless it committed within
    FRESH_S (see the outage invariant above)."""
    if time.monotonic() - getattr(conn, "_nnglass_used", -FRESH_S) >= FRESH_S:
        ConnectionPool.check_connection(conn)


def _redact(url: str) -> str:
    """`url` without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    user, _, host = rest.rpartition("@")
    return f"{scheme}{sep}{user.split(':')[0]}@{host}"
