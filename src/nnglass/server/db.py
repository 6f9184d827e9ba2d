"""The SQLite connection the key store and the job store each hold (`SQLiteFile`).

Invariants:
- A statement waits at most `BUSY_TIMEOUT_S` for a lock another process holds (a backup,
  the CLI, a second server on the same home), not SQLite's 30 s default, so a request
  behind a locked database still answers promptly.
- A lock that outlasts the wait is an `UnavailableError` (HTTP 503 with Retry-After),
  never a bare `sqlite3.OperationalError`; every other error is left as it is.
- WAL mode: readers never wait for a writer, so only writes can meet the lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UnavailableError

__all__ = ["BUSY_TIMEOUT_S", "SQLiteFile", "connect", "unavailable_when_locked"]

BUSY_TIMEOUT_S = 2.0
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes; extended codes add high bits


def connect(db_path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open `db_path` for sharing between threads (the caller holds a lock) and processes."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: autocommit; each statement is its own transaction unless we
    # say BEGIN.
    conn = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=busy_timeout)
    conn.row_factory = sqlite3.Row
    with unavailable_when_locked():
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives the process dying (what a server restart or a
        # crash needs) without an fsync per commit; only an OS crash can lose the last ones.
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _is_locked(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(error)
    return "database is locked" in text or "database table is locked" in text or "busy" in text


@contextmanager
def unavailable_when_locked() -> Iterator[None]:
    """Turn "database is locked" into UnavailableError; let every other error through."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if not _is_locked(e):
            raise
        raise UnavailableError(
            "the server's database is locked by another process; try again in a few seconds"
        ) from None


class SQLiteFile:
    """A store's SQLite file (created if missing, `schema` run on open): one connection its
    threads share under one lock. `_db()` is that connection for one statement, a lock
    another process holds too long turned into UnavailableError."""

    def __init__(self, db_path: Path, schema: str, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._conn = connect(self.db_path, busy_timeout)
        with self._db():
            self._conn.executescript(schema)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock, unavailable_when_locked():
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()
