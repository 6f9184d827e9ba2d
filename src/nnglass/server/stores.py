"""The one place that picks the stores a server holds, from its config's URLs.

Invariant: callers never branch on which stores they hold. `[server] database` empty
means SQLite in `home` with a process-local queue and event hub (the embedded
default); "postgresql://..." means the job store, the key store, the queue and the
event hub all in that database, shared by every frontend pointed at it.
`[server] results` empty means a folder in `home`; "s3://bucket/prefix" means S3.
`together()` makes the store calls made inside it on this thread one database
transaction where the stores share a database (PostgreSQL: one BEGIN..COMMIT, NOTIFYs
sent at its commit); elsewhere each call stands alone, as it would anyway. Each call is
atomic by itself either way; what `together` adds is that they commit as one (a small
result with its COMPLETED status, s3.py) and, for blocks of several statements, fewer
round trips. A call that is one statement costs one round trip alone (pg.py
`statement()`) and three as the whole of a `together` block (BEGIN, it, COMMIT).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .auth import Keys, KeyStore
from .config import ServerConfig
from .events import EventHub
from .jobs import JobStore, SQLiteJobStore
from .results import DirResultStore, ResultStore
from .scheduler import Queue, Scheduler

__all__ = ["Stores", "open_keys", "open_stores"]


@dataclass
class Stores:
    keys: Keys
    jobs: JobStore
    results: ResultStore
    scheduler: Queue
    hub: EventHub
    close: Callable[[], None]
    together: Callable[[], AbstractContextManager[Any]] = nullcontext


def open_results(config: ServerConfig, small: Any = None) -> ResultStore:
    """`small`: where S3 keeps small graphs instead (the job store's database)."""
    if config.results.startswith("s3://"):
        from .s3 import S3ResultStore  # boto3 only where S3 is asked for

        return S3ResultStore(config.results, small)
    return DirResultStore(Path(config.home) / "jobs")


def open_stores(config: ServerConfig, models: list[str]) -> Stores:
    if not config.database:
        results = open_results(config)
        home = Path(config.home)
        keys, jobs = KeyStore(home / "nnglass.db"), SQLiteJobStore(home / "nnglass.db")

        def close_sqlite() -> None:
            keys.close()
            jobs.close()

        return Stores(keys, jobs, results, Scheduler(models), EventHub(), close_sqlite)
    from .pg import Database  # psycopg only where PostgreSQL is asked for
    from .pg_events import Listener, PgHub
    from .pg_queue import PgQueue
    from .pg_stores import PgJobStore, PgKeyStore, PgSmallObjects

    db = Database(config.database, max_size=32)
    results = open_results(config, PgSmallObjects(db))
    listener = Listener(db)
    hub, queue, keys = PgHub(db, listener), PgQueue(db, listener, models), PgKeyStore(db, listener)
    listener.start()

    def close_pg() -> None:
        hub.relay.close()
        queue.close()
        listener.close()
        db.close()

    return Stores(keys, PgJobStore(db), results, queue, hub, close_pg, together=db.tx)


def open_keys(config: ServerConfig) -> Any:
    """The key store alone (the CLI): a `Keys`, with `close()`."""
    if not config.database:
        return KeyStore(Path(config.home) / "nnglass.db")
    from .pg import Database
    from .pg_stores import PgKeyStore

    db = Database(config.database, max_size=2)
    store = PgKeyStore(db)
    store.close = db.close  # type: ignore[method-assign]
    return store
