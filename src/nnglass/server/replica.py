"""A replica: one worker that holds a model, and the thread that feeds it jobs.

The service drives every replica through the `Worker` protocol (engines.py); `handle.WorkerHandle`
(a subprocess) is one implementation, `ray_worker.RayWorker` (a Ray actor) another. The replica loop
never asks which one it has.

Invariants:
- A job is marked RUNNING (and its attempt counted) before its request goes out; its
  answer becomes its final status. A job never meets a dead worker: the loop restarts
  it first. It is where a cancel finds it (`state.running`) from before its row says
  RUNNING, so a cancel as it begins stops it too: it never reaches its worker.
- A replica takes its model's next job only when its worker is idle, so with N replicas
  a job goes to one that is free (the least loaded) and never waits behind a busy one.
- An answer that carries its result's bytes (`data`: a worker on another machine, such
  as a Ray actor) has them put in the service's ResultStore before the job completes.
- Several queued jobs may share one request (co-tenancy). When that request comes back
  without an answer per job (the worker died in the pass: a hang past the time limit, a
  crash, the out-of-memory killer), each job still RUNNING runs once more alone on a
  restarted worker: only a job that kills it alone ends ERROR for it.
- A generate job asks its worker for step lines; each goes to the service's StepLog
  (server/steps.py) as it comes, and the log is ended when the worker answers.
- A generate job that this frontend queued starts a generation session (`_session`,
  server/replica_session.py; the worker's side, server/generation.py): at each of its step
  boundaries the model's next queued job and those that can share with it are taken
  (generate jobs join the batch), and other jobs run beside the batch as they come (or
  between two steps, on a worker that cannot), also while the batch is full; each is
  recorded when its answer comes; a cancelled one is dropped. A lost session is a lost
  shared pass (each job still in it reruns alone; a job alone in it ends ERROR, as a
  lone job does).
- A job's files reach the worker as `results.LocalFiles` (the result store's own files,
  or private copies); a result is committed to the store in the step that marks the job
  COMPLETED (`Service.finish(store=...)`: one transaction where the stores share a
  database), so any frontend that sees COMPLETED can serve it. The copies go when the job ends.
  A store that cannot write it (a full disk) makes the job ERROR with the reason.
- Nothing that fails in this loop (rather than in the worker) ends the replica's thread
  or leaves its jobs RUNNING: they end ERROR, and the loop takes the next job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..graph.ir import GENERATE
from . import clock
from .handle import GRACE_SECONDS
from .jobs import JobStatus
from .results import LocalFiles, why_not_stored

if TYPE_CHECKING:
    from .engines import Worker
    from .model_state import ModelState
    from .service import Service

log = logging.getLogger(__name__)


class Replica:
    """Feeds one worker the jobs of one model, from the service's scheduler."""

    def __init__(self, service: Service, state: ModelState, worker: Worker) -> None:
        self.service, self.state, self.worker = service, state, worker
        self._files: dict[str, LocalFiles] = {}  # job id -> its files, while it runs here

    def serve(self) -> None:
        """The replica's thread: start the worker, then run jobs until the service stops."""
        service, cfg = self.service, self.state.config
        if not self._start():
            return
        while not service.stopping:
            if not self.worker.alive and not self._restart():  # before taking a job: a replica
                return  # whose worker is down (its node lost) leaves the queue to the others
            job_id = service.scheduler.next(cfg.name, timeout=0.5)
            # Dead while this replica waited for the job (its node lost, killed from outside):
            # the job goes back to the queue for the others, and this replica restarts first.
            if not self.worker.alive:
                if job_id is not None:
                    service.release(job_id)
                    job_id = None
                if not self._restart():
                    return
            if job_id is not None:
                if self._room():  # the jobs being submitted now join this pass
                    service.arrivals.settle(cfg.share_settle_s)
                # A generation's first joiners are gathered as at a step boundary, at least.
                wait = max(cfg.share_wait_s, cfg.join_wait_s if service.generates(job_id) else 0)
                others = service.scheduler.take_sharing(cfg.name, job_id, cfg.share_jobs - 1,
                                                        tokens=cfg.share_tokens, wait=wait)
                try:
                    self.run_jobs([job_id, *others])
                except Exception as e:  # a defect, or a store failing past its retries: the
                    self._abandon([job_id, *others], e)  # replica lives on, its jobs end

    def _room(self) -> bool:
        """A pass about to start has room for jobs still being submitted (those queued do
        not fill it): only then does it wait for them, so a full pass never waits."""
        service, cfg = self.service, self.state.config
        return (cfg.share_jobs > 1 and service.arrivals.pending > 0
                and service.scheduler.depth(cfg.name) < cfg.share_jobs - 1)

    def _abandon(self, job_ids: list[str], e: Exception) -> None:
        """Jobs of a pass that failed in this loop (not in the worker) end ERROR, never
        stay RUNNING behind a dead replica thread."""
        log.exception("model %s: a pass failed in the server: %s", self.state.config.name, e)
        why = {"type": "RemoteError", "where": "",
               "message": f"the server failed while running this job ({type(e).__name__}); try again"}
        for job_id in job_ids:
            try:
                job = self.service.durably(self.service.jobs.get, job_id)
                if job is not None and not job.status.terminal:
                    self.service.finish(job_id, JobStatus.ERROR, error=why)
            except Exception:  # the service is stopping: recovery at the next start ends it
                log.exception("model %s: job %s left for recovery", self.state.config.name, job_id)

    def _restart(self) -> bool:
        if self.service.stopping:
            return False
        self.service.count("worker_restarts_total")
        return self._start()

    def _start(self) -> bool:
        state = self.state
        while not self.service.stopping:
            try:
                self.worker.start()
                # What a graph may name: modules, and the operations their forwards make.
                state.paths = set(self.worker.paths) | set(self.worker.ready.get("operations", ()))
                state.lookups = frozenset(tuple(site) for site in self.worker.ready.get("lookups", ()))
                if self.worker.ready.get("checksum"):
                    state.checksums.add(self.worker.ready["checksum"])
                state.state, state.error = "ready", ""
                return True
            except Exception as e:  # a model that fails to load must not take the server down
                state.state, state.error = "failed", f"{type(e).__name__}: {e}"
                log.error("model %s failed to start: %s", state.config.name, state.error)
                self.service.wait(5.0)
        return False

    def run_jobs(self, job_ids: list[str]) -> None:
        """Run one job, or several sharing one forward pass (co-tenancy)."""
        try:
            self._run_jobs(job_ids)
        finally:
            for job_id in [*job_ids, *self._files]:  # with those a generation session admitted
                files = self._files.pop(job_id, None)
                if files is not None:
                    files.close()

    def _run_jobs(self, job_ids: list[str]) -> None:
        requests = [r for r in (self._begin(job_id) for job_id in job_ids) if r is not None]
        if not requests:
            return
        service = self.service
        service.publish_queue(self.state.config.name, [r["job"] for r in requests])
        seconds = self.state.config.policy.limits.run_seconds
        tokens, began = service.pass_tokens([r["job"] for r in requests]), time.monotonic()
        try:
            self._run_pass(requests, seconds)
        finally:
            self.state.passes.ran(len(requests), tokens, time.monotonic() - began)

    def _run_pass(self, requests: list[dict[str, Any]], seconds: float) -> None:
        service = self.service
        if service.generates(requests[0]["job"], requests[0]):
            self._session(requests, seconds)
            return
        if len(requests) == 1:
            self._record(requests[0]["job"], self._run(requests, seconds + GRACE_SECONDS))
            return
        # After a failed shared pass the worker runs each job alone: a time limit for each.
        reply = self._run(requests, seconds * (len(requests) + 1) + GRACE_SECONDS)
        answers = reply.get("batch")
        if type(answers) is not list or len(answers) != len(requests):
            # No answers: the worker died in the pass, and which job did it is unknown.
            service.count("shared_passes_lost_total")
            self._rerun_alone(requests, seconds + GRACE_SECONDS)
            return
        service.count("shared_jobs_total", sum(1 for a in answers if a.get("shared")))
        steps = answers[0].get("steps") if type(answers[0]) is dict else None
        if type(steps) is list:
            self.state.passes.stepped(steps)
        debug = {k: reply[k] for k in ("checksum", "has_grad") if k in reply}
        for request, answer in zip(requests, answers):
            self._record(request["job"], {**answer, **debug})

    def _session(self, requests: list[dict[str, Any]], seconds: float) -> None:
        """Generate jobs in one continuous batch that queued jobs join (replica_session.py)."""
        from .replica_session import Session

        Session(self, seconds).run(requests)

    def _rerun_alone(self, requests: list[dict[str, Any]], timeout: float) -> None:
        """Each job of a shared pass that killed the worker (a hang past the time limit, a
        crash, the out-of-memory killer, a cancel) runs again alone, on a restarted worker,
        with its own time limit: an innocent job completes as it would have alone, and the
        job that killed the worker kills it again, alone, and ends ERROR with that reason.
        Once each, so a culprit cannot loop; the job stays RUNNING throughout."""
        service = self.service
        for request in requests:
            job = service.durably(service.jobs.get, request["job"])
            if job is None or job.status != JobStatus.RUNNING:
                continue  # cancelled meanwhile
            if not self.worker.alive and not self._restart():
                return  # stopping: the job stays RUNNING, and runs again after the restart
            service.durably(service.jobs.update, job.id, attempts=job.attempts + 1)
            self._record(job.id, self._run([request], timeout))

    def _begin(self, job_id: str, joining: bool = False) -> dict[str, Any] | None:
        """Mark a job RUNNING and build its request; None if it is no longer queued. Its
        waiters learn of it from the caller's `publish_queue`. `joining`: it joins the
        running generation session, where a cancel drops it at a step.

        The job is in `state.running` before its row says RUNNING, so no cancel falls
        between the two: one before finds it queued (`start` says None), one after finds
        it here (service._halt), and a job cancelled before its worker has it never goes."""
        self.state.running[job_id] = self.worker
        if joining:
            self.state.sharing.add(job_id)
        request = None
        try:
            request = self._request(job_id)
        finally:
            if request is None:  # not running here after all (or the store failed)
                self._untrack(job_id)
        return request

    def _untrack(self, job_id: str) -> None:
        state = self.state
        state.running.pop(job_id, None)
        state.sharing.discard(job_id)
        state.dropping.discard(job_id)

    def _request(self, job_id: str) -> dict[str, Any] | None:
        service = self.service
        job = service.durably(service.jobs.start, job_id, clock.now())
        if job is None:
            return None  # cancelled meanwhile
        self.state.passes.waited(clock.now() - (job.queued_at or job.created_at))
        try:
            files = self._files[job_id] = service.durably(service.results.local_files, job_id)
        except OSError as e:
            why = ("this job's graph is gone from storage" if isinstance(e, FileNotFoundError)
                   else f"this job's files could not be prepared: {why_not_stored(e)}")
            service.finish(job_id, JobStatus.ERROR, error={"type": "RemoteError", "message": why,
                                                           "where": ""})
            return None
        policy = self.state.config.policy
        return {
            "job": job_id, "graph": str(files.graph), "result": str(files.result),
            "tensors": str(files.tensors) if files.tensors else None, "limits": asdict(policy.limits),
            "hide_weights": not policy.weights_visible, "steps": job.mode == GENERATE,
        }

    def _run(self, requests: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
        """One request to the worker (several jobs: one shared pass); its answer."""
        state = self.state
        for request in requests:
            state.running[request["job"]] = self.worker  # where a cancel finds it
            if len(requests) > 1:
                state.sharing.add(request["job"])  # a cancel drops its answer, never stops the pass
        state.last_pass = len(requests)
        request = requests[0] if len(requests) == 1 else {"batch": requests}
        try:
            if request.get("job") in state.dropping:  # cancelled before its worker had it
                return {"status": "CANCELLED"}
            return self.worker.run(request, timeout=timeout, on_step=self.service.step_line)
        finally:
            for request in requests:
                self.service.steps.end(request["job"])
                self._untrack(request["job"])

    def _record(self, job_id: str, answer: dict[str, Any]) -> None:
        state, service = self.state, self.service
        service.job_ended(state, job_id)
        if answer.get("status") == "CANCELLED":
            return  # its row already says so
        if answer.get("checksum"):
            state.checksums.add(answer["checksum"])
            state.grad_seen = state.grad_seen or bool(answer.get("has_grad"))
        if answer.get("status") == "COMPLETED":
            files, data = self._files.get(job_id), answer.get("data")

            def store() -> None:  # in the transaction that marks it COMPLETED
                if isinstance(data, bytes):  # a worker without this server's disk
                    service.results.write_result(job_id, data)
                if files is not None:
                    files.commit()

            try:
                service.finish(job_id, JobStatus.COMPLETED, store=store, result_bytes=answer.get("bytes"))
                return
            except OSError as e:  # a full disk: this job's ERROR, the next job runs
                why = f"the result could not be stored: {why_not_stored(e)}"
                answer = {"status": "ERROR", "error": {"type": "RemoteError", "message": why, "where": ""}}
        service.finish(job_id, JobStatus.ERROR, error=answer.get("error") or {
            "type": "RemoteError", "message": "the worker gave no answer", "where": ""})
