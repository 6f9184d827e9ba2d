"""Generation steps across frontends: a stream on one frontend of a job whose worker another
frontend drives (several frontends on one PostgreSQL database, docs/deploy.md) gets the
job's step lines as that job's own frontend gets them (server/steps.py).

Interface (`EventHub.relay`): `want(job_id)` while a local reader follows a job's steps;
`export(line)` for each step line of a local worker; `attach(steps)` the local StepLog that
lines from elsewhere go into. `NO_RELAY` (one process: the embedded stores) does nothing;
`PgStepRelay` goes through LISTEN/NOTIFY:
  nnglass_steps_want  "<origin> <job id>"   a frontend has a reader of the job's steps
  nnglass_steps       {"o": origin, "job", "step", "tokens", "values" | "dropped"}

Invariants:
- Only what someone wants crosses: a frontend exports a job's lines only after another
  frontend said it wants them (then first the steps its log still holds), so a NOTIFY per
  step costs the database only for streams served elsewhere than their job runs.
- Bounded as the step log: a payload over MAX_PAYLOAD bytes goes without its values
  ("dropped": the reader takes them from the result), at most MAX_PENDING payloads wait
  to be sent (the oldest go), at most MAX_JOBS jobs are remembered as wanted; the
  receiving frontend's StepLog holds at most JOB_BYTES / JOB_STEPS per job.
- A line missed, late or twice is never a wrong answer: a reader that meets a gap (or
  the job ended first) reads the rest from the result, and a step already imported is
  not imported again. A frontend never imports its own lines.
- Nothing here blocks a caller on the database: NOTIFYs go from one sender thread, in
  one transaction per batch, in order.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import UnavailableError

if TYPE_CHECKING:
    from .pg import Database
    from .pg_events import Listener
    from .steps import StepLog

log = logging.getLogger(__name__)

STEPS_CHANNEL, WANT_CHANNEL = "nnglass_steps", "nnglass_steps_want"
MAX_PAYLOAD = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes
MAX_PENDING, MAX_JOBS = 4096, 1024


class NoRelay:
    """One frontend: every stream is where its job runs."""

    def attach(self, steps: StepLog) -> None:
        pass

    def export(self, line: dict[str, Any]) -> None:
        pass

    @contextmanager
    def want(self, job_id: str) -> Iterator[None]:
        yield


NO_RELAY = NoRelay()


class PgStepRelay:
    def __init__(self, db: Database, listener: Listener) -> None:
        self.db, self.origin = db, uuid.uuid4().hex[:16]
        self._steps: StepLog | None = None
        self._lock = threading.Condition()
        self._readers: dict[str, int] = {}  # job -> local readers of its steps
        self._imported: dict[str, int] = {}  # job -> the last step taken from elsewhere
        self._exported: OrderedDict[str, None] = OrderedDict()  # jobs another frontend wants
        self._pending: deque[tuple[str, str]] = deque(maxlen=MAX_PENDING)  # (channel, payload)
        self._closed = False
        listener.on(STEPS_CHANNEL, self._arrived)
        listener.on(WANT_CHANNEL, self._wanted)
        threading.Thread(target=self._sender, daemon=True, name="nnglass-step-relay").start()

    def attach(self, steps: StepLog) -> None:
        self._steps = steps

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @contextmanager
    def want(self, job_id: str) -> Iterator[None]:
        with self._lock:
            first = job_id not in self._readers
            self._readers[job_id] = self._readers.get(job_id, 0) + 1
        if first:
            self._queue(WANT_CHANNEL, f"{self.origin} {job_id}")
        try:
            yield
        finally:
            with self._lock:
                self._readers[job_id] -= 1
                last = not self._readers[job_id]
                if last:
                    del self._readers[job_id]
                imported = last and self._imported.pop(job_id, None) is not None
            if imported and self._steps is not None:  # lines from elsewhere: nobody here reads them now
                self._steps.end(job_id)
                self._steps.discard(job_id)

    def export(self, line: dict[str, Any]) -> None:
        job_id = str(line.get("job"))
        if job_id not in self._exported:  # (a want landing meanwhile sends this line from the log)
            return
        with self._lock:
            self._send_line(line)

    # --- the listener's side ------------------------------------------------------------
    def _wanted(self, payload: str) -> None:
        origin, _, job_id = payload.partition(" ")
        if origin == self.origin or not job_id:
            return
        with self._lock:  # (held while the log is read: a line exported meanwhile comes after it)
            self._exported[job_id] = None
            self._exported.move_to_end(job_id)
            while len(self._exported) > MAX_JOBS:
                self._exported.popitem(last=False)
            if self._steps is not None:  # the steps made before the reader came (if it runs here)
                for step in self._steps.read(job_id, -1).steps:
                    self._send_line(step.line(job_id))

    def _arrived(self, payload: str) -> None:
        try:
            line = json.loads(payload)
            job_id, step = str(line["job"]), int(line["step"])
        except (ValueError, KeyError, TypeError):
            return
        if line.get("o") == self.origin or self._steps is None:
            return
        with self._lock:
            if job_id not in self._readers or step <= self._imported.get(job_id, -1):
                return
            self._imported[job_id] = step
        self._steps.add(line)

    # --- the sender -----------------------------------------------------------------------
    def _send_line(self, line: dict[str, Any]) -> None:
        message = {"o": self.origin, **line}
        payload = json.dumps(message, separators=(",", ":"))
        if len(payload) > MAX_PAYLOAD and "values" in message:
            message.pop("values")
            payload = json.dumps({**message, "dropped": True}, separators=(",", ":"))
        if len(payload) <= MAX_PAYLOAD:  # (else: the reader meets a gap and reads the result)
            self._queue(STEPS_CHANNEL, payload)

    def _queue(self, channel: str, payload: str) -> None:
        with self._lock:
            self._pending.append((channel, payload))
            self._lock.notify_all()

    def _sender(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                batch = list(self._pending)
                self._pending.clear()
            try:
                with self.db.tx() as conn:
                    conn.execute("SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS t(c, p)",
                                 ([c for c, _ in batch], [p for _, p in batch]))
            except UnavailableError:  # lost: the readers elsewhere read the result
                log.info("%d step notifications not sent: the database is unavailable", len(batch))
            except Exception:
                log.exception("step notifications not sent")
