"""A replica's generation session (server/generation.py is the worker's side): generate
jobs in one continuous batch that queued generate jobs join at its step boundaries; other
jobs run beside it, taken as they come (`beside`, asked from the worker's own thread) or at
a step boundary; each is recorded when its answer comes.

Invariants:
- At most one pass of jobs runs beside the batch when the worker asks (`beside`), and a
  step boundary adds one more only while fewer than two run there: the jobs wait in the
  fair queue, never in the worker, so a key with many queued jobs delays another key's
  job by at most the pass beside the batch now.
- Every job taken is RUNNING and in `state.sharing` before it goes (replica._begin): a
  cancel drops it (at its next step in the batch; beside the batch, its answer), and
  only it. A lost session (the worker died) runs each job still in it again alone, as a
  lost shared pass does; a job alone in it then ends ERROR with the reason, as a lone job
  does.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Any

from .batching import GENERATION
from .handle import GRACE_SECONDS

if TYPE_CHECKING:
    from .replica import Replica


class Session:
    """One generation session of `replica`; `seconds`: a job's time limit."""

    def __init__(self, replica: Replica, seconds: float) -> None:
        self.replica, self.seconds = replica, seconds
        self.service, self.state, self.cfg = replica.service, replica.state, replica.state.config
        self.live: dict[str, dict[str, Any]] = {}  # job -> its request, until it is answered
        self.aside: dict[str, int] = {}  # job -> its pass, for the jobs beside the batch
        self.lock = threading.Condition()  # live and aside: the replica's thread and the worker's
        self._passes = itertools.count()
        self.seen = 0

    def run(self, requests: list[dict[str, Any]]) -> None:
        replica, service = self.replica, self.service
        self.track(requests)
        try:
            lost = replica.worker.stream(requests, self.on_step, self.seconds * 2 + GRACE_SECONDS,
                                         service.step_line, beside=self.beside)
        finally:
            left = list(self.live.values())
            for job in list(self.live):
                self.untrack(job)
        if self.seen > 1:
            service.count("shared_jobs_total", self.seen)
        if lost is not None and len(left) == 1:  # alone in the batch when the worker died:
            replica._record(left[0]["job"], lost)  # as a lone job's crash, it ends ERROR with why
        elif lost is not None and left:
            service.count("shared_passes_lost_total")
            replica._rerun_alone(left, self.seconds + GRACE_SECONDS)

    def track(self, new: list[dict[str, Any]], beside: bool = False) -> None:
        with self.lock:
            self.seen += len(new)
            n = next(self._passes)
            for r in new:
                self.live[r["job"]] = r
                self.state.running[r["job"]] = self.replica.worker
                self.state.sharing.add(r["job"])
                if beside:
                    self.aside[r["job"]] = n

    def untrack(self, job: str) -> None:
        self.service.steps.end(job)
        with self.lock:
            self.live.pop(job, None)
            if self.aside.pop(job, None) is not None:
                self.lock.notify_all()
        self.replica._untrack(job)

    def beside(self, wait: float) -> list[dict[str, Any]]:
        """The next jobs to run beside the batch, waiting up to `wait` s for one (none while
        a pass runs there already, or with sharing off: one job at a time)."""
        with self.lock:
            if self.aside or self.cfg.share_jobs <= 1 or self.service.stopping:
                self.lock.wait(wait)
                return []
        job_id = self.service.scheduler.next(self.cfg.name, timeout=wait, skip=GENERATION)
        new = self.take(job_id, self.cfg.share_jobs - 1, 0)
        self.track(new, beside=True)
        return new

    def on_step(self, message: dict[str, Any]) -> dict[str, Any]:
        """A step message (or one of answers beside the batch: no reply) -> the reply."""
        replica, state = self.replica, self.state
        debug = {k: message[k] for k in ("checksum", "has_grad") if k in message}
        for answer in message.get("answers") or ():
            if answer.get("job") in self.live:
                self.untrack(answer["job"])
                replica._record(answer["job"], {**answer, **debug})
                files = replica._files.pop(answer["job"], None)
                if files is not None:
                    files.close()
        if message.get("beside"):
            return {}
        state.passes.stepped(message.get("steps") or [])
        with self.lock:
            drop = [j for j in self.live if j in state.dropping]
        for j in drop:
            self.untrack(j)
        with self.lock:
            running, beside = len(self.live) - len(self.aside), len(set(self.aside.values()))
        more, others = [], set()
        if message.get("running") and not self.service.stopping:
            more, others = self.more(running, beside)
        for r in [r for r in more if r["job"] in state.dropping]:  # cancelled as it began
            more.remove(r)
            replica._untrack(r["job"])
        self.track([r for r in more if r["job"] not in others])
        self.track([r for r in more if r["job"] in others], beside=True)
        return {"more": more, "drop": drop, "timeout": self.seconds * (len(more) + 2) + GRACE_SECONDS}

    def more(self, running: int, beside: int) -> tuple[list[dict[str, Any]], set[str]]:
        """At a step boundary: the model's next queued job and what can share with it; when
        that is generate jobs joining, also the next other job and its sharers, so a small
        trace never waits behind joiners of other keys. `beside`: passes beside the batch
        now; with one, no other job after joiners; with two, nothing. Also which of them do
        not join (they run beside the batch)."""
        service, cfg = self.service, self.cfg
        if cfg.share_jobs <= 1 or beside >= 2:  # sharing off: one job at a time, none beside
            return [], set()
        # A full batch takes no generate job, but other jobs still run beside it: a small
        # trace never waits for a whole generation.
        skip = GENERATION if running >= cfg.share_jobs else None
        new: list[dict[str, Any]] = []
        others: set[str] = set()
        while (job_id := service.scheduler.next(cfg.name, timeout=0, skip=skip)) is not None:
            joining = service.generates(job_id)  # joiners arriving meanwhile join with it
            limit = cfg.share_jobs - running - 1 if joining else cfg.share_jobs - 1
            taken = self.take(job_id, limit, cfg.join_wait_s if joining else 0)
            new += taken
            if not joining:
                others.update(r["job"] for r in taken)
                break
            if beside:
                break
            skip = GENERATION
        return new, others

    def take(self, job_id: str | None, limit: int, wait: float) -> list[dict[str, Any]]:
        """`job_id` (just taken from the queue) and the queued jobs that can share its pass
        (at most `limit`), begun: RUNNING, where a cancel drops them."""
        if job_id is None:
            return []
        service, cfg = self.service, self.cfg
        taken = [job_id, *service.scheduler.take_sharing(cfg.name, job_id, limit, tokens=cfg.share_tokens,
                                                         wait=wait)]
        new = [r for r in (self.replica._begin(j, joining=True) for j in taken) if r is not None]
        if new:
            service.publish_queue(cfg.name, [r["job"] for r in new])
        return new
