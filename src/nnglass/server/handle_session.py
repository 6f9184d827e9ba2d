"""The parent's side of a generation session over a worker child's pipe (the protocol is
server/generation.py's; `WorkerHandle.stream` calls `converse`).

Invariants:
- The session ends only when the child has said running 0, the reply admitted nothing,
  and every job sent to it (in the session, a step reply, or a beside message) has its
  answer; each answer reaches `on_step` once, as it comes.
- Waiting is bounded: for the next step message, the reply's timeout; for a job beside the
  batch, its pass's own (one time limit a job, one more, the grace) from when it was sent,
  or from when the child first lists it in its lane; past either, the child is killed and
  the session lost.
- The feeder is the only other writer, and it stops (its last taken jobs sent, and then
  waited for) before the session's last reply goes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .handle import GRACE_SECONDS, _absolute_paths, error_answer

if TYPE_CHECKING:
    from .handle import WorkerHandle

logger = logging.getLogger(__name__)

Beside = Callable[[float], list[dict[str, Any]]]  # wait seconds -> jobs to run beside the batch
OnStep = Callable[[dict[str, Any]], dict[str, Any]]


def converse(handle: WorkerHandle, requests: list[dict[str, Any]], on_step: OnStep, timeout: float,
             on_line: Callable[[dict[str, Any]], None] | None,
             beside: Beside | None) -> dict[str, Any] | None:
    """The session on `handle` (whose lock the caller holds): None when it ended, else the
    answer that says why it was lost. An OSError: the pipe broke (the caller says crash)."""
    session = _Session(handle, requests, timeout)
    feeder = None
    try:
        handle._write({"stream": [_absolute_paths(r) for r in requests]})
        if beside is not None and handle.ready.get("beside"):
            feeder = _Feeder(handle, session, beside)
        while True:
            try:
                msg = handle._lines.get(timeout=session.wait())
            except queue.Empty:
                handle.kill()
                return error_answer(None, "TimeLimitError",
                                    f"time limit: the worker was stopped after {session.limit:g} s")
            if msg is None:
                return handle._crashed(None)
            if not msg.get("session") and not msg.get("beside"):
                if on_line is not None and msg.get("job") is not None and "step" in msg:
                    on_line(msg)  # a job's step line (server/steps.py)
                continue
            session.answered(msg.get("answers") or (), msg.get("lane") or ())
            if msg.get("beside"):
                on_step(msg)
            else:
                reply = on_step(msg)
                more = [_absolute_paths(r) for r in reply.get("more") or []]
                session.sent(more, float(reply.pop("timeout", session.limit)))
                if not msg.get("running") and not more:
                    if feeder is not None:  # what it sent until now is waited for
                        feeder.stop()
                    session.end()
                handle._write({"more": more, "drop": list(reply.get("drop") or [])})
            if session.done:
                return None
    finally:
        if feeder is not None:
            feeder.stop()





class _Session:
    """What the parent waits for in a generation session: the next step message (until the
    session ends), and each job's answer; a job beside the batch has its own deadline."""

    def __init__(self, handle: WorkerHandle, requests: list[dict[str, Any]], timeout: float) -> None:
        self.handle, self.limit = handle, timeout
        self.step_deadline: float | None = time.monotonic() + timeout
        self.waiting: dict[Any, float | None] = {}  # job -> its answer's deadline (None: the steps')
        self.seen: set[Any] = set()
        self.seconds: dict[Any, float] = {}  # job -> its time to answer once beside the batch
        self.sent(requests, timeout)

    def sent(self, requests: list[dict[str, Any]], timeout: float, beside: bool = False) -> None:
        """Jobs now with the child; `timeout`: until the next step message, or (`beside`) the
        answer of these jobs."""
        now = time.monotonic()
        with self.handle._jobs_lock:
            for r in requests:
                self.waiting[r.get("job")] = now + timeout if beside else None
                self.seconds[r.get("job")] = _pass_timeout([r], self.limit)
            self.seen.update(r.get("job") for r in requests)
            self.handle._jobs = frozenset(self.seen)
            if not beside:
                self.limit, self.step_deadline = timeout, now + timeout

    def answered(self, answers: Any, beside: Any = ()) -> None:
        """`answers` came; the jobs `beside` run beside the batch (their own deadline now)."""
        with self.handle._jobs_lock:
            for a in answers:
                if type(a) is dict:
                    self.waiting.pop(a.get("job"), None)
            for job in beside if type(beside) is list else ():
                if job in self.waiting and self.waiting[job] is None:
                    self.waiting[job] = time.monotonic() + self.seconds.get(job, self.limit)

    def end(self) -> None:
        """No more steps: the jobs still unanswered (beside the batch) have a step's time."""
        with self.handle._jobs_lock:
            self.step_deadline = None
            for job, deadline in self.waiting.items():
                self.waiting[job] = deadline or time.monotonic() + self.limit

    @property
    def done(self) -> bool:
        return self.step_deadline is None and not self.waiting

    def wait(self) -> float:
        with self.handle._jobs_lock:
            deadlines = [d for d in (self.step_deadline, *self.waiting.values()) if d is not None]
        return max(min(deadlines) - time.monotonic(), 0.0)


class _Feeder:
    """The thread that hands the child jobs to run beside its batch as the replica has them."""

    WAIT_S = 0.05  # each ask waits this long for a job, so that `stop` is prompt

    def __init__(self, handle: WorkerHandle, session: _Session, beside: Beside) -> None:
        self.handle, self.session, self.beside = handle, session, beside
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-beside")
        self._thread.start()

    def stop(self) -> None:
        """No more asks; returns once any jobs already taken are sent."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                requests = [_absolute_paths(r) for r in self.beside(self.WAIT_S)]
            except Exception:  # a defect in the replica's taking: it ends those jobs itself
                logger.exception("jobs to run beside a generation could not be taken")
                requests = []
            if not requests:
                continue
            self.session.sent(requests, _pass_timeout(requests, self.session.limit), beside=True)
            try:
                self.handle._write({"beside": requests})
            except (OSError, ValueError):  # the child is gone: the session's thread sees its EOF
                return


def _pass_timeout(requests: list[dict[str, Any]], default: float) -> float:
    """How long a pass of `requests` may take: as a shared pass's (replica.py), one time
    limit per job and one more (a failed pass runs each alone), and the grace."""
    seconds = max(float((r.get("limits") or {}).get("run_seconds") or 0) for r in requests)
    return (seconds or default) * (len(requests) + 1) + GRACE_SECONDS
