"""The job store and the key store in PostgreSQL (pg.py holds the pool and the schema).

Same contracts as `jobs.SQLiteJobStore` and `auth.KeyStore` (the contract tests in
tests/server/test_store_contract.py run against both): each write is one statement,
so atomic across threads, processes and frontends; a terminal status is final (the
guard is in the UPDATE's WHERE); keys are stored as SHA-256 hashes only and `list()`
never returns a key or a hash (a frontend's store remembers the keys it verified, at
most auth.KEY_CACHE_S, forgotten at any revoke's NOTIFY: docs/security.md); an
unreachable database is UnavailableError from any method, and then nothing was written.
`PgSmallObjects` holds the job objects small enough to live next to the job's row (s3.py's
`small`). PostgreSQL text cannot hold a NUL character: an id with one names no job (as in
SQLite), a key name with one is a ValueError.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import psycopg

from .auth import SqlKeys, VerifiedKeys
from .jobs import _COLUMNS, _FIELDS, _START, _TERMINAL_SQL, _UPDATABLE, Job, JobStatus, _to_sql
from .pg import Database
from .pg_events import KEYS_CHANNEL, Listener

__all__ = ["PgJobStore", "PgKeyStore", "PgSmallObjects"]


def _job(row: dict[str, Any]) -> Job:
    row = {k: v for k, v in row.items() if k in _FIELDS}
    row["status"] = JobStatus(row["status"])
    row["error"] = None if row["error"] is None else json.loads(row["error"])
    return Job(**row)


class PgJobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, job: Job) -> Job:
        values = [_to_sql(c, getattr(job, c)) for c in _COLUMNS]
        sql = (
            f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
            "RETURNING seq"
        )
        try:
            with self.db.statement() as conn:
                seq = conn.execute(sql, values).fetchone()["seq"]
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a job with id {job.id!r} already exists") from None
        return dataclasses.replace(job, seq=seq)

    def get(self, job_id: str) -> Job | None:
        if "\x00" in job_id:
            return None  # no id has one; PostgreSQL would refuse the query
        with self.db.statement() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def update(self, job_id: str, **fields: Any) -> bool:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update job field(s) {sorted(unknown)}; updatable: {sorted(_UPDATABLE)}")
        if not fields:
            return self.get(job_id) is not None
        names = sorted(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{n} = %s' for n in names)} WHERE id = %s"
        if "status" in fields:
            sql += f" AND status NOT IN ({_TERMINAL_SQL})"  # the guard in the same statement
        with self.db.statement() as conn:
            return conn.execute(sql + " RETURNING 1", [*(_to_sql(n, fields[n]) for n in names),
                                                       job_id]).fetchone() is not None

    def start(self, job_id: str, started_at: float) -> Job | None:
        with self.db.statement() as conn:
            row = conn.execute(_START, (started_at, job_id)).fetchone()
        return None if row is None else _job(row)

    def by_status(self, *statuses: JobStatus, model: str | None = None) -> list[Job]:
        if not statuses:
            return []
        sql, params = "SELECT * FROM jobs WHERE status = ANY(%s)", [[JobStatus(s).value for s in statuses]]
        if model is not None:
            sql += " AND model = %s"
            params.append(model)
        with self.db.statement() as conn:
            return [_job(r) for r in conn.execute(sql + " ORDER BY seq", params).fetchall()]

    def by_key(self, key_id: str, limit: int, before: str | None = None) -> list[Job]:
        sql, params = "SELECT * FROM jobs WHERE key_id = %s", [key_id]
        if before is not None:
            sql += " AND seq < (SELECT seq FROM jobs WHERE id = %s AND key_id = %s)"
            params += [before, key_id]
        with self.db.statement() as conn:
            rows = conn.execute(sql + " ORDER BY seq DESC LIMIT %s", [*params, int(limit)]).fetchall()
        return [_job(r) for r in rows]

    def unfinished(self) -> list[Job]:
        return self.by_status(*(s for s in JobStatus if not s.terminal))

    def expired(self, now: float) -> list[Job]:
        sql = f"SELECT * FROM jobs WHERE expires_at <= %s AND status IN ({_TERMINAL_SQL}) ORDER BY seq"
        with self.db.statement() as conn:
            return [_job(r) for r in conn.execute(sql, (now,)).fetchall()]

    def close(self) -> None:
        pass  # the Database is closed by whoever opened it


class PgKeyStore(SqlKeys):
    """With `listener` (a frontend): the keys it verified are remembered (auth.VerifiedKeys)
    while the listener listens, and forgotten at each revoke's NOTIFY and each reconnect.
    Every revoke, through whichever process, sends that NOTIFY in its own transaction."""

    _duplicate = psycopg.errors.UniqueViolation

    def __init__(self, db: Database, listener: Listener | None = None) -> None:
        self.db = db
        if listener is not None:
            self._verified = VerifiedKeys(live=lambda: listener.live)
            listener.on(KEYS_CHANNEL, lambda _payload: self._forget())
            listener.on_connect(self._forget)

    def _forget(self) -> None:
        if self._verified is not None:
            self._verified.forget()

    def revoke(self, name_or_id: str) -> bool:
        with self.db.tx() as conn:
            revoked = super().revoke(name_or_id)
            if revoked:
                conn.execute("SELECT pg_notify(%s, '')", (KEYS_CHANNEL,))  # every frontend forgets
        if revoked:
            self._forget()  # this one now, not when its own NOTIFY comes back
        return revoked

    def _db(self) -> Any:
        return self.db.statement()  # each of SqlKeys' statements stands alone (revoke: below)

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def close(self) -> None:
        pass


class PgSmallObjects:
    """Small job objects (a graph, a result) in the database, written in the transaction
    open on this thread: a graph in its job's submission, a result in the transaction that
    marks its job COMPLETED (each commits with its row)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, job_id: str, name: str, data: bytes) -> None:
        with self.db.statement() as conn:
            conn.execute(
                "INSERT INTO small_objects (job_id, name, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (job_id, name) DO UPDATE SET data = EXCLUDED.data, written = EXCLUDED.written",
                (job_id, name, data),
            )

    def get(self, job_id: str, name: str) -> bytes | None:
        with self.db.statement() as conn:
            row = conn.execute(
                "SELECT data FROM small_objects WHERE job_id = %s AND name = %s", (job_id, name)
            ).fetchone()
        return None if row is None else bytes(row["data"])

    def delete(self, job_id: str) -> bool:
        with self.db.statement() as conn:
            sql = "DELETE FROM small_objects WHERE job_id = %s RETURNING 1"
            return bool(conn.execute(sql, (job_id,)).fetchall())

    def written(self) -> dict[str, float]:
        """Each job's newest object's time (epoch seconds, the database's clock)."""
        with self.db.statement() as conn:
            sql = "SELECT job_id, max(written) AS t FROM small_objects GROUP BY job_id"
            rows = conn.execute(sql).fetchall()
        return {r["job_id"]: float(r["t"]) for r in rows}
