"""The Service: jobs from submission to result, behind the HTTP routes.

Invariants:
- `submit` checks the graph (wire codec, then the model's policy) and persists the job
  (graph files, then the row, QUEUED) before it returns; the route answers after that.
- Every job ends COMPLETED, ERROR or CANCELLED. The store's first terminal status
  wins, so a cancel racing a completion cannot flip it. After a restart, jobs left
  QUEUED are queued again and jobs left RUNNING run once more (then fail with a reason).
- A job is visible only to the key that created it: anyone else gets NotFoundError,
  the same answer as for a job that does not exist.
- Each replica is one worker subprocess driven by one thread; a crash or a timeout
  ends that job as ERROR with the reason, and the worker is restarted. When a shared
  forward pass kills the worker, each of its jobs still running runs once more alone on
  a restarted worker: only a job that kills it alone ends ERROR for it.
- A locked database is an UnavailableError (503) for a request, and never loses a
  job: the background threads wait it out and then write what they had to.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, QuotaError, UnavailableError
from ..graph import wire
from ..graph.check import Limits as WireLimits
from ..graph.merge import share_key
from .auth import KeyStore
from .config import ModelConfig, ServerConfig
from .events import EventHub
from .exposure import describe
from .handle import GRACE_SECONDS, WorkerHandle
from .jobs import Job, JobStatus, SQLiteJobStore
from .policy import check_policy
from .results import DirResultStore
from .scheduler import Scheduler

log = logging.getLogger(__name__)
_RETRY_S = 0.5  # how often a background thread tries a locked database again


@dataclass
class ModelState:
    config: ModelConfig
    paths: set[str] = field(default_factory=set)
    lookups: frozenset[tuple[str, str]] | None = None  # sites that are lookups of weights (None: unknown)
    state: str = "loading"  # loading | ready | failed
    error: str = ""
    running: dict[str, WorkerHandle] = field(default_factory=dict)
    checksums: set[str] = field(default_factory=set)  # debug: weights after each job and at start
    grad_seen: bool = False  # debug: a parameter had a .grad after a job (must never happen)
    handles: list[WorkerHandle] = field(default_factory=list)  # one per replica
    last_pass: int = 0  # jobs in the last request a replica ran (1: alone, more: one shared pass)
    ended: deque[float] = field(default_factory=deque)  # when worker-run jobs ended, last minute only


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        home = Path(config.home)
        home.mkdir(parents=True, exist_ok=True)
        self.keys = KeyStore(home / "nnglass.db")
        self.jobs = SQLiteJobStore(home / "nnglass.db")
        self.results = DirResultStore(home / "jobs")
        self.hub = EventHub()
        self.models = {m.name: ModelState(m) for m in config.models}
        self.scheduler = Scheduler(list(self.models))
        self.counters: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._handles: list[WorkerHandle] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        for state in self.models.values():
            for replica in range(state.config.replicas):
                self._spawn(self._serve_replica, state, replica)
        self._spawn(self._expire_loop)

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.close()
        for handle in list(self._handles):
            handle.kill()
        for t in self._threads:
            t.join(timeout=10)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"nnglass-{target.__name__}")
        t.start()
        self._threads.append(t)

    def _recover(self) -> None:
        """Jobs a previous server left unfinished run again, or fail with a reason."""
        waiting = (JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING)
        for job in self._durably(self.jobs.by_status, *waiting):
            graph_path, _ = self.results.graph_paths(job.id)
            if job.model not in self.models or not graph_path.exists():
                self._finish(job.id, JobStatus.ERROR, error={
                    "type": "RemoteError", "where": "",
                    "message": "the server restarted and this job's model or graph is gone"})  # fmt: skip
            elif job.status == JobStatus.RUNNING and job.attempts >= 2:
                self._finish(job.id, JobStatus.ERROR, error={
                    "type": "RemoteError", "where": "",
                    "message": "this job was started twice and the server or its worker stopped "
                               "both times before it finished"})  # fmt: skip
            else:
                self._durably(self.jobs.update, job.id, status=JobStatus.QUEUED.value, queued_at=time.time())
                self.scheduler.submit(job.model, job.key_id, job.id)

    # --- requests --------------------------------------------------------------------------
    def submit(self, key_id: str, graph_json: bytes, tensors: bytes | None) -> Job:
        graph = wire.decode(graph_json, tensors, limits=self._wire_limits())
        state = self.models.get(graph.model)
        if state is None:
            raise NotFoundError(f"no model {graph.model!r} on this server; it serves "
                                f"{', '.join(sorted(self.models)) or 'none'}")  # fmt: skip
        policy = state.config.policy
        if state.lookups is None and not (policy.weights_visible or policy.expose_embeddings):
            # Which sites reveal the weights is known once a replica has loaded them.
            raise UnavailableError(f"model {graph.model!r} is still loading; try again in a few seconds")
        check_policy(graph, policy, state.paths or _paths_of(state), state.lookups)
        with self._key_lock(key_id):  # the quota check and the queueing are one step per key
            if self.scheduler.queued_by(key_id) >= self.config.max_queued_per_key:
                raise QuotaError(f"this key already has {self.config.max_queued_per_key} jobs waiting; "
                                 "wait for some to finish")  # fmt: skip
            job = Job(key_id=key_id, model=graph.model, mode=graph.mode, status=JobStatus.QUEUED)
            job.queued_at = job.created_at
            self.results.save_graph(job.id, graph_json, tensors)  # the graph first, then the row:
            try:  # a row always has its graph (recovery relies on it)
                job = self.jobs.create(job)
            except UnavailableError:
                self.results.delete(job.id)  # not accepted: leave nothing behind
                raise
            self.scheduler.submit(graph.model, key_id, job.id, share=share_key(graph))
        self._count("jobs_submitted_total")
        self.hub.publish(job.id)  # a live view of all this key's jobs learns of it now
        return job  # not read back: once the row exists the job is accepted, locked database or not

    def _key_lock(self, key_id: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key_id, threading.Lock())

    def get(self, key_id: str, job_id: str) -> Job:
        try:
            job = self.jobs.get(job_id)
        except ValueError:
            job = None
        if job is None or job.key_id != key_id:
            raise NotFoundError(f"no job {job_id!r} for this key")
        return job

    def list_jobs(self, key_id: str, limit: int, before: str | None = None) -> tuple[list[Job], str | None]:
        """Up to `limit` of this key's jobs, newest first, created before the job `before`
        (a cursor: the last id of the previous page); and the cursor of the next page."""
        if before is not None:
            self.get(key_id, before)  # another key's job is no cursor: NotFoundError, as for get
        jobs = self.jobs.by_key(key_id, limit + 1, before)
        return jobs[:limit], jobs[limit - 1].id if len(jobs) > limit else None

    def cancel(self, key_id: str, job_id: str) -> Job:
        job = self.get(key_id, job_id)
        if job.status.terminal:
            return job
        # The row first: if the database is locked this raises and nothing has changed (the
        # job is still queued); a replica that takes the job meanwhile sees CANCELLED.
        self._finish(job.id, JobStatus.CANCELLED, retry=False)
        self.scheduler.cancel(job.model, job.id)
        handle = self.models[job.model].running.get(job.id)
        if handle is not None:
            handle.stop_job(job.id)  # its thread sees the worker die, restarts it; CANCELLED stays
        self._publish_queue(job.model)
        return self.get(key_id, job_id)

    def result_path(self, key_id: str, job_id: str) -> Path:
        job = self.get(key_id, job_id)
        if job.status != JobStatus.COMPLETED or not self.results.has_result(job.id):
            raise NotFoundError(f"job {job_id} has no result ({job.status.value.lower()})")
        return self.results.result_path(job.id)

    def status(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": job.id, "model": job.model, "status": job.status.value, "created_at": job.created_at,
            "queued_at": job.queued_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "expires_at": job.expires_at, "result_bytes": job.result_bytes,
        }  # fmt: skip
        if job.status == JobStatus.QUEUED:
            out["position"] = self.scheduler.positions(job.model).get(job.id, 0)
        if job.error:
            out["error"] = job.error
        return out

    def models_info(self) -> list[dict[str, Any]]:
        out = []
        for name, s in self.models.items():
            info = {"name": name, "state": s.state, "error": s.error or None, "source": s.config.source,
                    "replicas": s.config.replicas, "queue_depth": self.scheduler.depth(name),
                    "running": len(s.running), "policy": s.config.policy.summary(),
                    "exposure": describe(s.config.policy, s.lookups)}  # fmt: skip
            info.update(self._activity(s))
            if self.config.debug_checksums:  # one checksum seen across all jobs: weights never changed
                info["weight_checksums"] = sorted(s.checksums)
                info["grad_seen"] = s.grad_seen
            out.append(info)
        return out

    def _activity(self, s: ModelState) -> dict[str, Any]:
        """What the replicas do, from what this process saw (no estimates)."""
        with self._lock:
            while s.ended and s.ended[0] < time.time() - 60:
                s.ended.popleft()
            ended = len(s.ended)
        return {
            "replicas_alive": sum(h.alive for h in s.handles),
            "replicas_busy": len({id(h) for h in list(s.running.values())}),
            "last_pass_jobs": s.last_pass,
            "jobs_last_minute": ended,
        }

    # --- workers ---------------------------------------------------------------------------
    def _serve_replica(self, state: ModelState, replica: int) -> None:
        cfg = state.config
        handle = WorkerHandle({
            "name": cfg.name, "source": cfg.source, "dtype": cfg.dtype, "threads": cfg.threads,
            "debug_checksums": self.config.debug_checksums,
        })  # fmt: skip
        self._handles.append(handle)
        state.handles.append(handle)
        if not self._start_worker(state, handle):
            return
        while not self._stop.is_set():
            job_id = self.scheduler.next(cfg.name, timeout=0.5)
            # Dead since the last job, or while idle (killed from outside): a job must never
            # meet a dead worker, so it restarts first.
            if not handle.alive and not self._restart_worker(state, handle):
                return  # stopping: a job taken is still QUEUED in the store, for the next start
            if job_id is not None:
                others = self.scheduler.take_sharing(cfg.name, job_id, cfg.share_jobs - 1)
                self._run_jobs(state, handle, [job_id, *others])

    def _restart_worker(self, state: ModelState, handle: WorkerHandle) -> bool:
        if self._stop.is_set():
            return False
        self._count("worker_restarts_total")
        return self._start_worker(state, handle)

    def _start_worker(self, state: ModelState, handle: WorkerHandle) -> bool:
        while not self._stop.is_set():
            try:
                handle.restart() if handle.pid is not None else handle.start()
                state.paths = set(handle.paths)
                state.lookups = frozenset(tuple(site) for site in handle.ready.get("lookups", ()))
                if handle.ready.get("checksum"):
                    state.checksums.add(handle.ready["checksum"])
                state.state, state.error = "ready", ""
                return True
            except Exception as e:  # a model that fails to load must not take the server down
                state.state, state.error = "failed", f"{type(e).__name__}: {e}"
                log.error("model %s failed to start: %s", state.config.name, state.error)
                self._stop.wait(5.0)
        return False

    def _run_jobs(self, state: ModelState, handle: WorkerHandle, job_ids: list[str]) -> None:
        """Run one job, or several sharing one forward pass (co-tenancy), on this replica."""
        requests = [r for r in (self._begin(state, job_id) for job_id in job_ids) if r is not None]
        if not requests:
            return
        self._publish_queue(state.config.name)
        seconds = state.config.policy.limits.run_seconds
        if len(requests) == 1:
            answer = self._run_on(state, handle, requests, seconds + GRACE_SECONDS)
            self._record(state, requests[0]["job"], answer)
            return
        # After a failed shared pass the worker runs each job alone: a time limit for each.
        reply = self._run_on(state, handle, requests, seconds * (len(requests) + 1) + GRACE_SECONDS)
        answers = reply.get("batch")
        if type(answers) is not list or len(answers) != len(requests):
            # No answers: the worker died in the pass, and which job did it is unknown.
            self._count("shared_passes_lost_total")
            self._rerun_alone(state, handle, requests, seconds + GRACE_SECONDS)
            return
        self._count("shared_jobs_total", sum(1 for a in answers if a.get("shared")))
        debug = {k: reply[k] for k in ("checksum", "has_grad") if k in reply}
        for request, answer in zip(requests, answers):
            self._record(state, request["job"], {**answer, **debug})

    def _rerun_alone(
        self, state: ModelState, handle: WorkerHandle, requests: list[dict[str, Any]], timeout: float
    ) -> None:
        """Each job of a shared pass that killed the worker (a hang past the time limit, a
        crash, the out-of-memory killer, a cancel) runs again alone, on a restarted worker,
        with its own time limit: an innocent job completes as it would have alone, and the
        job that killed the worker kills it again, alone, and ends ERROR with that reason.
        Once each, so a culprit cannot loop; the job stays RUNNING throughout."""
        for request in requests:
            job = self._durably(self.jobs.get, request["job"])
            if job is None or job.status != JobStatus.RUNNING:
                continue  # cancelled meanwhile
            if not handle.alive and not self._restart_worker(state, handle):
                return  # stopping: the job stays RUNNING, and runs again after the restart
            self._durably(self.jobs.update, job.id, attempts=job.attempts + 1)
            self._record(state, job.id, self._run_on(state, handle, [request], timeout))

    def _begin(self, state: ModelState, job_id: str) -> dict[str, Any] | None:
        """Mark a job RUNNING and build its request; None if it is no longer queued."""
        job = self._durably(self.jobs.get, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return None  # cancelled meanwhile
        if not self._durably(self.jobs.update, job_id, status=JobStatus.RUNNING.value, started_at=time.time(),
                             attempts=job.attempts + 1):  # fmt: skip
            return None
        self.hub.publish(job_id)
        graph_path, tensor_path = self.results.graph_paths(job_id)
        policy = state.config.policy
        return {
            "job": job_id, "graph": str(graph_path), "tensors": str(tensor_path) if tensor_path else None,
            "result": str(self.results.result_path(job_id)), "limits": asdict(policy.limits),
            "hide_weights": not policy.weights_visible,
        }  # fmt: skip

    def _run_on(
        self, state: ModelState, handle: WorkerHandle, requests: list[dict[str, Any]], timeout: float
    ) -> dict[str, Any]:
        """One request to the worker (several jobs: one shared pass); its answer."""
        for request in requests:
            state.running[request["job"]] = handle  # where a cancel finds it
        state.last_pass = len(requests)
        try:
            return handle.run(requests[0] if len(requests) == 1 else {"batch": requests}, timeout=timeout)
        finally:
            for request in requests:
                state.running.pop(request["job"], None)

    def _record(self, state: ModelState, job_id: str, answer: dict[str, Any]) -> None:
        with self._lock:
            state.ended.append(time.time())
        if answer.get("checksum"):
            state.checksums.add(answer["checksum"])
            state.grad_seen = state.grad_seen or bool(answer.get("has_grad"))
        if answer.get("status") == "COMPLETED":
            self._finish(job_id, JobStatus.COMPLETED, result_bytes=answer.get("bytes"))
        else:
            self._finish(job_id, JobStatus.ERROR, error=answer.get("error") or {
                "type": "RemoteError", "message": "the worker gave no answer", "where": ""})  # fmt: skip

    def _finish(self, job_id: str, status: JobStatus, *, retry: bool = True, **fields: Any) -> None:
        """The job's final status. `retry`: wait out a locked database (background threads,
        which must not lose it); else a locked database raises UnavailableError."""
        now = time.time()
        fields.update(status=status.value, finished_at=now, expires_at=now + self.config.result_ttl_s)
        write = functools.partial(self.jobs.update, job_id, **fields)
        if self._durably(write) if retry else write():
            self._count(f'jobs_finished_total{{status="{status.value}"}}')
        self.hub.publish(job_id)

    def _durably(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(...)` on a store, waiting while the database is locked (by another process,
        e.g. a backup or the CLI); raises only if the server stops meanwhile."""
        warned = False
        while True:
            try:
                return call(*args, **kwargs)
            except UnavailableError as e:
                if not warned:
                    log.warning("%s; trying again every %g s", e.message, _RETRY_S)
                    warned = True
                if self._stop.wait(_RETRY_S):
                    raise

    def _publish_queue(self, model: str) -> None:
        for job_id in self.scheduler.positions(model):
            self.hub.publish(job_id)

    def _expire_loop(self) -> None:
        while not self._stop.wait(min(60.0, max(1.0, self.config.result_ttl_s / 4))):
            try:
                for job in self.jobs.expired(time.time()):
                    # The result goes; the job's record stays (its status still answers).
                    self.results.delete(job.id)
                    self.jobs.update(job.id, expires_at=None, result_bytes=None)
            except UnavailableError as e:  # a locked database: the next round does it
                log.info("expiring results later: %s", e.message)

    # --- metrics ---------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def metrics(self) -> str:
        lines = [f"nnglass_{name} {value}" for name, value in sorted(self.counters.items())]
        for name, s in self.models.items():
            lines.append(f'nnglass_queue_depth{{model="{name}"}} {self.scheduler.depth(name)}')
            lines.append(f'nnglass_running_jobs{{model="{name}"}} {len(s.running)}')
            lines.append(f'nnglass_model_ready{{model="{name}"}} {int(s.state == "ready")}')
        return "\n".join(lines) + "\n"

    def _wire_limits(self) -> WireLimits:
        return WireLimits(max_json_bytes=self.config.max_request_bytes,
                          max_tensor_bytes=self.config.max_request_bytes)  # fmt: skip


def _paths_of(state: ModelState) -> set[str]:
    """Module paths before a worker is ready: the model's tree on the meta device."""
    from ..models import loading

    source = loading.resolve_model_source(state.config.source)
    config, _ = loading.load_config_and_tokenizer(source)
    state.paths = {p for p, _ in loading.meta_model(config).named_modules()}
    return state.paths

