"""The job store: the one record of every job the server accepted.

Invariants:
- A job id is `secrets.token_urlsafe(24)` (unguessable; it also names the job's result
  directory, see results.py).
- Status moves RECEIVED → QUEUED → RUNNING → COMPLETED | ERROR | CANCELLED. A terminal
  status is final: `update` refuses, whole and atomically, any write that names a
  status once the job is terminal, so when a cancel races a completion the first
  terminal status wins and the loser learns it from the False it gets back.
- `by_status` answers in creation order (`seq`, assigned by the store, strictly
  increasing), which is the order the scheduler's fairness starts from; `by_key` (one
  key's jobs, for listing) in the reverse order, newest first.
- `expired(now)` answers terminal jobs only: a job still queued or running never
  expires out from under its owner (nothing lost: docs/security.md).
- Timestamps are float epoch seconds from `clock.now` (a clock step back never puts
  one before an earlier one); `error` is `{"message", "where", "type"}` stored as JSON text.
- `SQLiteJobStore` uses one connection (`check_same_thread=False`) behind a lock, WAL
  mode; each write is one SQL statement, hence atomic across threads and processes.
  A database locked by another process for longer than `busy_timeout` (db.py) is an
  `UnavailableError` from any method, and then nothing was written.
  `JobStore` is the seam a PostgreSQL backend implements; callers never branch on it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from . import clock
from .db import BUSY_TIMEOUT_S, SQLiteFile

__all__ = ["Job", "JobStatus", "JobStore", "SQLiteJobStore", "new_job_id"]


class JobStatus(str, Enum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED})


def new_job_id() -> str:
    return secrets.token_urlsafe(24)


@dataclass(kw_only=True)
class Job:
    key_id: str
    model: str
    id: str = field(default_factory=new_job_id)
    status: JobStatus = JobStatus.RECEIVED
    created_at: float = field(default_factory=clock.now)
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    error: dict[str, Any] | None = None  # {"message", "where", "type"}
    result_bytes: int | None = None  # size of the stored result
    attempts: int = 0  # times a worker started it (a crash re-queues it)
    mode: str = "trace"  # trace | generate | scan | session: what the scheduler may batch
    seq: int | None = None  # creation order, assigned by the store

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)


# Fields `update` may write; `id` and `seq` are fixed at creation.
_UPDATABLE = frozenset(f.name for f in dataclasses.fields(Job)) - {"id", "seq"}


class JobStore(Protocol):
    def create(self, job: Job) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def update(self, job_id: str, **fields: Any) -> bool: ...
    def start(self, job_id: str, started_at: float) -> Job | None: ...
    def by_status(self, *statuses: JobStatus, model: str | None = None) -> list[Job]: ...
    def by_key(self, key_id: str, limit: int, before: str | None = None) -> list[Job]: ...
    def unfinished(self) -> list[Job]: ...
    def expired(self, now: float) -> list[Job]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    key_id       TEXT NOT NULL,
    model        TEXT NOT NULL,
    status       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    queued_at    REAL,
    started_at   REAL,
    finished_at  REAL,
    expires_at   REAL,
    error        TEXT,
    result_bytes INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    mode         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status_model ON jobs(status, model, seq);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs(expires_at);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key_id, seq);
"""
_COLUMNS = [f.name for f in dataclasses.fields(Job) if f.name != "seq"]
_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))  # a table may hold more (a dropped field)
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in JobStatus if s.terminal)
# A queued job starts (both stores; SQLite's placeholders are "?").
_START = ("UPDATE jobs SET status = 'RUNNING', started_at = %s, attempts = attempts + 1 "
          "WHERE id = %s AND status = 'QUEUED' RETURNING *")


def _to_sql(name: str, value: Any) -> Any:
    if name == "status":
        return JobStatus(value).value
    if name == "error":
        return None if value is None else json.dumps(value)
    return value


def _from_row(row: sqlite3.Row) -> Job:
    d = {k: v for k, v in dict(row).items() if k in _FIELDS}
    d["status"] = JobStatus(d["status"])
    d["error"] = None if d["error"] is None else json.loads(d["error"])
    return Job(**d)


class SQLiteJobStore(SQLiteFile):
    """Jobs in the SQLite file `db_path` (created if missing; may be shared with KeyStore).
    `busy_timeout`: how long a statement waits for another process's lock."""

    def __init__(self, db_path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        super().__init__(db_path, _SCHEMA, busy_timeout)

    def create(self, job: Job) -> Job:
        """Persist a new job; return it with `seq` set. A duplicate id is a ValueError."""
        values = [_to_sql(c, getattr(job, c)) for c in _COLUMNS]
        sql = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        try:
            with self._db() as db:
                cur = db.execute(sql, values)
        except sqlite3.IntegrityError:
            raise ValueError(f"a job with id {job.id!r} already exists") from None
        return dataclasses.replace(job, seq=cur.lastrowid)

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _from_row(row)

    def update(self, job_id: str, **fields: Any) -> bool:
        """Set `fields` on the job, atomically. False if there is no such job, or if
        `fields` names a status and the job is already terminal (then nothing changes)."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update job field(s) {sorted(unknown)}; updatable: {sorted(_UPDATABLE)}")
        if not fields:
            return self.get(job_id) is not None
        names = sorted(fields)
        sql = f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
        if "status" in fields:
            # The guard lives in the same statement as the write: no read-then-write race.
            sql += f" AND status NOT IN ({_TERMINAL_SQL})"
        params = [_to_sql(n, fields[n]) for n in names] + [job_id]
        with self._db() as db:
            cur = db.execute(sql, params)
        return cur.rowcount == 1

    def start(self, job_id: str, started_at: float) -> Job | None:
        """The job, now RUNNING with one more attempt; None unless it was QUEUED."""
        with self._db() as db:
            rows = db.execute(_START.replace("%s", "?"), (started_at, job_id)).fetchall()  # all: the
        return _from_row(rows[0]) if rows else None  # statement ends (and commits) before the lock goes

    def by_status(self, *statuses: JobStatus, model: str | None = None) -> list[Job]:
        """Jobs in any of `statuses` (optionally of one model), oldest first."""
        if not statuses:
            return []
        sql = f"SELECT * FROM jobs WHERE status IN ({', '.join('?' * len(statuses))})"
        params: list[Any] = [JobStatus(s).value for s in statuses]
        if model is not None:
            sql += " AND model = ?"
            params.append(model)
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY seq", params).fetchall()
        return [_from_row(r) for r in rows]

    def by_key(self, key_id: str, limit: int, before: str | None = None) -> list[Job]:
        """Up to `limit` of `key_id`'s jobs, newest first; with `before` (a job id), only
        those created before that job, which must be `key_id`'s too (else: none)."""
        sql, params = "SELECT * FROM jobs WHERE key_id = ?", [key_id]
        if before is not None:
            sql += " AND seq < (SELECT seq FROM jobs WHERE id = ? AND key_id = ?)"
            params += [before, key_id]
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY seq DESC LIMIT ?", [*params, int(limit)]).fetchall()
        return [_from_row(r) for r in rows]

    def unfinished(self) -> list[Job]:
        """Jobs not yet terminal (what a restarting server must re-queue or fail)."""
        return self.by_status(*(s for s in JobStatus if not s.terminal))

    def expired(self, now: float) -> list[Job]:
        """Terminal jobs whose `expires_at` is at or before `now`, oldest first."""
        sql = f"SELECT * FROM jobs WHERE expires_at <= ? AND status IN ({_TERMINAL_SQL}) ORDER BY seq"
        with self._db() as db:
            rows = db.execute(sql, (now,)).fetchall()
        return [_from_row(r) for r in rows]


    def __enter__(self) -> SQLiteJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
