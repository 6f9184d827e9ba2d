"""A generation's steps, from the worker that runs it to the streams that read them while
it runs (the OpenAI endpoints' `stream=True`, `/v1/jobs/{id}/events?steps=1`).

Worker side: `step_sender(job, send, budget)` is the job's `runtime.steps.StepListener`;
each step becomes one protocol line (server/worker.py):
    {"job", "step": k, "tokens": [[id, ...] one list per row],
     "values": base64 of the step's saved values (graph.results' format) | absent,
     "dropped": true when they were too large to stream (only the result has them)}
Server side: the replica hands each line to `StepLog.add`; readers take steps by cursor.

Invariants:
- The steps are a preview of the result, never more: their values count against the
  job's `result_bytes` (past it, and past MAX_STEP_BYTES for one step, values are
  dropped and only tokens go on), and a reader that misses anything (a gap, dropped
  values, a job whose lines did not reach it) takes the rest from the result, so what it
  sends is the result either way.
- Bounded memory: per job at most JOB_BYTES of values and JOB_STEPS steps (the oldest
  go first: a reader behind them sees a gap); an ended job's log is kept for its
  readers until one has read it to the end, at most ENDED_KEPT of them.
- Local to this process: `add` wakes only this process's waiters (`EventHub.wake`). A
  stream on another frontend gets the lines through the hub's relay (step_relay.py), which
  sends a job's lines only once such a stream asked for them.
- A step numbered like one already logged (the job runs again) breaks the log:
  readers see a gap, never a mix of two runs.
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..graph.results import decode_results, encode_results
from ..runtime.steps import StepListener
from ..runtime.values import tensor_leaves

MAX_STEP_BYTES = 1 << 20
JOB_BYTES, JOB_STEPS, ENDED_KEPT = 8 << 20, 4096, 8


def step_sender(job: Any, send: Callable[[dict[str, Any]], None], budget: int) -> StepListener:
    """The listener that sends `job`'s steps as protocol lines, values within `budget` bytes."""
    left = [budget]

    def on_step(step: int, tokens: torch.Tensor, saved: dict[int, Any]) -> None:
        message: dict[str, Any] = {"job": job, "step": step, "tokens": tokens.tolist()}
        if saved:
            room = min(left[0], MAX_STEP_BYTES)  # the tensors' size first: nothing too big is copied
            fits = sum(t.numel() * t.element_size() for t in tensor_leaves(saved)) < room
            data = encode_results(saved) if fits else b""
            if 0 < len(data) <= room:
                left[0] -= len(data)
                message["values"] = base64.b64encode(data).decode("ascii")
            else:
                left[0] = 0  # once one step's values are dropped, the rest are too: readers fall back
                message["dropped"] = True
        send(message)

    return on_step


@dataclass(frozen=True)
class Step:
    step: int
    tokens: list[list[int]]  # per row of the job
    data: bytes | None  # the step's saved values (graph.results' format); None: nothing saved
    dropped: bool  # values too large to stream: only the result has them

    def values(self) -> dict[int, Any]:
        return decode_results(self.data) if self.data else {}

    def line(self, job: str) -> dict[str, Any]:
        """The step as the worker's protocol line."""
        out: dict[str, Any] = {"job": job, "step": self.step, "tokens": self.tokens}
        if self.data is not None:
            out["values"] = base64.b64encode(self.data).decode("ascii")
        if self.dropped:
            out["dropped"] = True
        return out


@dataclass
class Steps:
    """What a reader got: steps after its cursor, whether it missed any, whether more come."""

    steps: list[Step]
    gap: bool = False  # steps after the cursor are gone (or the log broke): use the result
    ended: bool = False  # the worker answered: no step comes after these


@dataclass
class _Log:
    steps: deque[Step] = field(default_factory=deque)
    first: int = 0  # the oldest step still held (earlier ones were dropped)
    size: int = 0
    ended: bool = False
    broken: bool = False


class StepLog:
    """Each running (and recently ended) job's latest steps; `wake(job_id)` tells its readers."""

    def __init__(self, wake: Callable[[str], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def add(self, message: dict[str, Any]) -> None:
        """A worker's step line (see the module docstring)."""
        job_id, k = str(message.get("job")), int(message["step"])
        values = message.get("values")
        step = Step(k, message.get("tokens") or [], base64.b64decode(values) if values else None,
                    bool(message.get("dropped")))
        with self._lock:
            log = self._logs.setdefault(job_id, _Log(first=k))
            if (log.steps and k <= log.steps[-1].step) or log.ended:
                log.broken = True
            log.steps.append(step)
            log.size += len(step.data or b"") + 8 * sum(len(r) for r in step.tokens)
            while log.steps and (log.size > JOB_BYTES or len(log.steps) > JOB_STEPS):
                old = log.steps.popleft()
                log.size -= len(old.data or b"") + 8 * sum(len(r) for r in old.tokens)
                log.first = old.step + 1
        self._wake(job_id)

    def end(self, job_id: str) -> None:
        """The worker answered for the job: no more steps."""
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:
                return
            log.ended = True
            self._ended[job_id] = None
            while len(self._ended) > ENDED_KEPT:
                self._logs.pop(self._ended.popitem(last=False)[0], None)
        self._wake(job_id)

    def read(self, job_id: str, after: int) -> Steps:
        """The steps numbered above `after` (-1: from the first)."""
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:  # not started, run where steps do not reach; or gone after this reader's steps
                return Steps([], gap=after >= 0)
            if log.broken or log.first > after + 1:
                return Steps([], gap=True, ended=log.ended)
            return Steps([s for s in log.steps if s.step > after], ended=log.ended)

    def discard(self, job_id: str) -> None:
        """A reader is done with an ended job's steps."""
        with self._lock:
            log = self._logs.get(job_id)
            if log is not None and log.ended:
                del self._logs[job_id]
                self._ended.pop(job_id, None)
