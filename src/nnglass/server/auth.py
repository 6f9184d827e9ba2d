"""API keys, stored hashed (in SQLite here; in PostgreSQL, pg_stores.py).

Invariants:
- A key is `"nng_" + secrets.token_urlsafe(32)` (256 random bits). Only its SHA-256 hex
  digest is stored; the key itself is returned once, by `create`, and never again. A
  fast hash is right here: the key is a random token, not a password, so there is
  nothing to brute-force that a slow hash would protect.
- `verify` is one indexed lookup by hash (it runs on every request) and answers the
  key_id of a live key, else None. It never raises on bad input. The SQLite store has no
  in-memory cache: `nnglass keys revoke` in another process takes effect on the next
  request. A store may hold a `VerifiedKeys` (PostgreSQL's does, pg_stores.py): then a
  key it found live answers from memory for at most `KEY_CACHE_S`, and every revoke,
  through any process, empties every such cache when its NOTIFY arrives (milliseconds);
  `KEY_CACHE_S` bounds only a notification that never arrives. Only live keys are
  remembered (a wrong key always costs a lookup), at most `VerifiedKeys.limit` of them.
- Names are unique among live keys (a revoked key's name may be reused; the revoked
  row stays for the record, since jobs refer to its key_id).
- `list()` never returns a key or a hash.
- One connection (`check_same_thread=False`) guarded by a lock, WAL mode, so FastAPI's
  handler threads and other processes (the CLI) can share the file. The same file may
  hold the jobs table (`<home>/nnglass.db`). A database locked by another process for
  longer than `busy_timeout` (db.py) is an `UnavailableError` from any method (`verify`
  too: "cannot tell now" is not "no such key").
- `Keys` is the seam: this SQLite `KeyStore` and `pg_stores.PgKeyStore` keep the same
  contract; callers never branch on which one they hold. Both are `SqlKeys` (the logic,
  written once) over their own connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .db import BUSY_TIMEOUT_S, SQLiteFile

__all__ = ["KEY_CACHE_S", "KEY_PREFIX", "KeyStore", "Keys", "SqlKeys", "VerifiedKeys"]

KEY_PREFIX = "nng_"
KEY_CACHE_S = 5.0  # a remembered key is looked up again after this (docs/security.md)
_MAX_KEY_CHARS = 128  # a real key is 47 characters; anything far longer is not one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id      TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    hash    TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_live_name ON api_keys(name) WHERE revoked IS NULL;
"""


class Keys(Protocol):
    def create(self, name: str) -> tuple[str, str]: ...
    def verify(self, key: str | None) -> str | None: ...
    def list(self) -> list[dict[str, Any]]: ...
    def revoke(self, name_or_id: str) -> bool: ...
    def close(self) -> None: ...


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class VerifiedKeys:
    """The live keys this process verified lately: digest -> (key_id, when). `forget()`
    (a revoke anywhere, or a notification channel that was down) drops them all, and a
    lookup begun before a `forget()` is never remembered after it (`mark`/`put`): the
    revoke it may have missed wins. `live()` False (no notifications now): nothing is
    answered from memory or remembered."""

    def __init__(self, live: Callable[[], bool], ttl: float = KEY_CACHE_S, limit: int = 4096) -> None:
        self.live, self.ttl, self.limit = live, ttl, limit
        self._lock = threading.Lock()
        self._known: dict[str, tuple[str, float]] = {}
        self._forgets = 0

    def get(self, digest: str) -> str | None:
        if not self.live():
            return None
        with self._lock:
            hit = self._known.get(digest)
        if hit is None or time.monotonic() - hit[1] >= self.ttl:
            return None
        return hit[0]

    def mark(self) -> int:
        """Taken before a lookup; hand it to `put`."""
        return self._forgets

    def put(self, digest: str, key_id: str, mark: int) -> None:
        with self._lock:
            if mark != self._forgets or not self.live():
                return  # a revoke (or an outage) since the lookup began: not remembered
            if len(self._known) >= self.limit:
                self._known.clear()
            self._known[digest] = (key_id, time.monotonic())

    def forget(self) -> None:
        with self._lock:
            self._forgets += 1
            self._known.clear()


class SqlKeys:
    """The key store's logic in SQL, for any driver: a subclass gives `_db()` (a
    connection whose `execute(sql, params)` answers a cursor; the statements in one `with`
    are one transaction), `_sql(text)` (its placeholders, written here as "?"),
    `_duplicate` (its unique-violation error) and `_tiebreak` (the column that orders keys
    created at the same instant). PostgreSQL text cannot hold a NUL: no key name has one."""

    _duplicate: type[Exception] = Exception
    _tiebreak = "id"
    _verified: VerifiedKeys | None = None  # none: every verify is a lookup

    def _db(self) -> Any:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text

    def create(self, name: str) -> tuple[str, str]:
        """Make a new key named `name`; return `(key_id, key)`. The key is shown only now."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a key needs a non-empty name, e.g. `nnglass keys create alice`")
        name = name.strip()
        if "\x00" in name:
            raise ValueError("a key name cannot contain a NUL character")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        try:
            with self._db() as db:
                db.execute(self._sql("INSERT INTO api_keys (id, name, hash, created) VALUES (?, ?, ?, ?)"),
                           (key_id, name, _hash(key), time.time()))
        except self._duplicate:
            raise ValueError(
                f"a live key named {name!r} already exists; revoke it first "
                f"(`nnglass keys revoke {name}`) or pick another name"
            ) from None
        return key_id, key

    def verify(self, key: str | None) -> str | None:
        """The key_id of the live key `key`, or None (missing, malformed, unknown, revoked)."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) > _MAX_KEY_CHARS:
            return None
        digest, verified = _hash(key), self._verified
        if verified is not None and (known := verified.get(digest)) is not None:
            return known
        mark = 0 if verified is None else verified.mark()
        with self._db() as db:
            row = db.execute(self._sql("SELECT id, hash FROM api_keys WHERE hash = ? AND revoked IS NULL"),
                             (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["hash"], digest):
            return None
        if verified is not None:
            verified.put(digest, str(row["id"]), mark)
        return str(row["id"])

    def list(self) -> list[dict[str, Any]]:
        """Every key, oldest first: id, name, created, revoked (epoch seconds or None)."""
        with self._db() as db:
            rows = db.execute(
                f"SELECT id, name, created, revoked FROM api_keys ORDER BY created, {self._tiebreak}"
            ).fetchall()
        return [{k: r[k] for k in ("id", "name", "created", "revoked")} for r in rows]

    def revoke(self, name_or_id: str) -> bool:
        """Revoke the live key with this id (else this name); False if there is none."""
        if "\x00" in name_or_id:
            return False  # no key has one
        now = time.time()
        with self._db() as db:
            # An id match wins, so a name that happens to look like another key's id
            # never revokes two keys at once.
            for column in ("id", "name"):
                sql = f"UPDATE api_keys SET revoked = ? WHERE {column} = ? AND revoked IS NULL RETURNING id"
                if db.execute(self._sql(sql), (now, name_or_id)).fetchall():
                    return True
        return False


class KeyStore(SqlKeys, SQLiteFile):
    """API keys in the SQLite file `db_path` (created if missing). `busy_timeout`: how
    long a statement waits for another process's lock."""

    _duplicate, _tiebreak = sqlite3.IntegrityError, "rowid"

    def __init__(self, db_path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        SQLiteFile.__init__(self, db_path, _SCHEMA, busy_timeout)

    _db = SQLiteFile._db  # SqlKeys asks for `_db()`: the file's

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
