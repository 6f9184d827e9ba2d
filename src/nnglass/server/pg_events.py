"""Changes across frontends: PostgreSQL LISTEN/NOTIFY under the in-process EventHub.

Invariants:
- One listener thread per process, on a connection of its own (outside the pool), calls
  the handlers of each channel with the payload. It reconnects after a database outage;
  what it missed meanwhile is at worst seen late, since every waiter re-reads on its
  timeout (events.py) and the queue is polled too (pg_queue.py). `live` says whether it
  listens now; `on_connect` handlers run at each (re)connect, once it listens (what was
  remembered on the word of notifications may have missed some: pg_stores' key cache).
- `PgHub.publish(job_id)` is a NOTIFY, sent at the commit of the transaction it is
  part of; this frontend delivers it to its own waiters right then (`after_commit`), every
  other frontend's listener when it arrives. A NOTIFY names the hub that sent it (its
  `origin`), which skips its own when they come back: each change wakes each waiter once.
  A database that cannot take the NOTIFY still delivers locally: this frontend's streams
  never wait on the outage.
- Payloads are "<origin> <job id or model name>", never who owns the job (as events.py).
  Generation steps (server/steps.py) cross only for a stream that wants them, through the
  hub's relay (`step_relay.PgStepRelay`); `wake` is the local hub's.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

import psycopg

from ..errors import UnavailableError
from .events import EventHub
from .pg import Database
from .step_relay import PgStepRelay

__all__ = ["JOBS_CHANNEL", "KEYS_CHANNEL", "QUEUE_CHANNEL", "Listener", "PgHub"]

log = logging.getLogger(__name__)
JOBS_CHANNEL, QUEUE_CHANNEL, KEYS_CHANNEL = "nnglass_jobs", "nnglass_queue", "nnglass_keys"


class Listener:
    """A thread that LISTENs to channels and hands each notification to its handlers."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._handlers: dict[str, list[Callable[[str], None]]] = {}
        self._connected: list[Callable[[], None]] = []
        self.live = False  # LISTENing now
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    def on_connect(self, handler: Callable[[], None]) -> None:
        self._connected.append(handler)

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="nnglass-pg-listener")
        self._thread.start()
        self._ready.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.db.connect() as conn:
                    for channel in self._handlers:
                        conn.execute(f"LISTEN {channel}")
                    for handler in self._connected:
                        handler()
                    self.live = True
                    self._ready.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            for handler in self._handlers.get(note.channel, ()):
                                try:
                                    handler(note.payload)
                                except Exception:  # one handler's bug must not stop the others
                                    log.exception("handler for %s failed", note.channel)
            except psycopg.Error as e:
                self.live = False
                log.warning("lost the database's notifications (%s); reconnecting", type(e).__name__)
                self._stop.wait(1.0)
        self.live = False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class PgHub(EventHub):
    """An EventHub whose publish reaches every frontend's waiters."""

    def __init__(self, db: Database, listener: Listener) -> None:
        super().__init__()
        self.db, self.origin = db, secrets.token_hex(8)
        listener.on(JOBS_CHANNEL, self._arrived)
        self.relay = PgStepRelay(db, listener)

    def _arrived(self, payload: str) -> None:
        origin, _, job_id = payload.partition(" ")
        if origin != self.origin:  # this hub's own were delivered at their commit
            self.deliver(job_id)

    def publish(self, job_id: str) -> None:
        self.publish_many([job_id])

    def publish_many(self, job_ids: list[str]) -> None:
        """One transaction for all (a job's start moves every queued job's position)."""
        if not job_ids:
            return
        try:
            with self.db.statement() as conn:  # alone, or in the caller's transaction
                notify = "SELECT pg_notify(%s, %s || ' ' || id) FROM unnest(%s::text[]) AS id"
                conn.execute(notify, (JOBS_CHANNEL, self.origin, job_ids))
                self.db.after_commit(lambda: self._deliver_all(job_ids))  # (alone: now, sent)
        except UnavailableError:
            self._deliver_all(job_ids)  # this frontend's waiters still learn of it now

    def _deliver_all(self, job_ids: list[str]) -> None:
        """This frontend's own changes to its waiters (its observers, which look for a
        cancel made elsewhere, have nothing to learn: no job get on the committing thread)."""
        for job_id in job_ids:
            self.deliver(job_id, observed=False)
