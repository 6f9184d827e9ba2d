"""The Service: jobs from submission to result, behind the HTTP routes.

Invariants:
- `submit` checks the graph (wire codec, then the model's policy) and persists the job
  (graph files, then the row, QUEUED) before it returns; the route answers after that.
- Every job ends COMPLETED, ERROR or CANCELLED. The store's first terminal status
  wins, so a cancel racing a completion cannot flip it. After a restart, jobs left
  QUEUED are queued again and jobs left RUNNING run once more (then fail with a reason).
- A job is visible only to the key that created it: anyone else gets NotFoundError,
  the same answer as for a job that does not exist.
- Each replica is one worker (a subprocess, or a Ray actor with `engine = "ray"`)
  driven by one thread, which takes its model's next job only when it is idle; a crash, a timeout
  ends that job as ERROR with the reason, and the worker is restarted. When a shared
  forward pass kills the worker, each of its jobs still running runs once more alone on
  a restarted worker: only a job that kills it alone ends ERROR for it.
- A locked database is an UnavailableError (503) for a request, and never loses a
  job: the background threads wait it out and then write what they had to. A result
  store that cannot write (a full disk) is a 503 for a submission (nothing of it kept)
  and its job's ERROR for a result; the server goes on serving.
- The stores, the queue and the event hub come from `stores.open_stores` (SQLite, a
  folder and this process's memory by default; PostgreSQL and S3 shared by several
  frontends otherwise); nothing here asks which. Jobs no live process holds (a
  previous run's, or a dead frontend's) are recovered at start and every few seconds;
  the files of a submission killed before its row are removed (leftovers.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import NotFoundError, QuotaError, UnavailableError
from ..graph import wire
from ..graph.check import Limits as WireLimits
from ..graph.ir import SESSION
from ..models.batched_generate import generation_key
from ..models.prompts import check_prompts
from . import clock, upkeep
from .arrivals import Arrivals
from .batching import GENERATION, cost_of, prompt_tokens, share_of
from .config import ServerConfig
from .engines import Worker, WorkerFactory, configured_worker
from .jobs import Job, JobStatus
from .model_state import ModelState
from .policy import check_policy
from .replica import Replica
from .results import why_not_stored
from .steps import StepLog
from .stores import open_stores

log = logging.getLogger(__name__)
_RETRY_S = 0.5  # how often a background thread tries a locked database again


class Service:
    """The request side (submit, get, list, cancel, status) and the lifecycle; each
    model replica is a `Replica` (server/replica.py) driving one `Worker`."""

    def __init__(self, config: ServerConfig, worker: WorkerFactory = configured_worker) -> None:
        self.config = config
        Path(config.home).mkdir(parents=True, exist_ok=True)
        self.models = {m.name: ModelState(m) for m in config.models}
        self.stores = open_stores(config, list(self.models))
        self.keys, self.jobs, self.results = self.stores.keys, self.stores.jobs, self.stores.results
        self.scheduler, self.hub = self.stores.scheduler, self.stores.hub
        self.arrivals = Arrivals()  # submissions being taken in, which a pass due now waits for
        self.steps = StepLog(self.hub.wake)  # running generations' latest steps, for streams
        self.hub.relay.attach(self.steps)  # (and those of jobs run by another frontend)
        self.hub.observe(self._changed)
        self._worker = worker
        self.counters: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prompt_tokens: dict[str, int] = {}  # job id -> its prompts' real tokens, until it ends
        self._padded: dict[str, tuple[int, int]] = {}  # job id -> (rows, padded width), until it ends
        self._generating: set[str] = set()  # queued here, may join a generation session

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        upkeep.recover(self)
        for state in self.models.values():
            for _ in range(state.config.replicas):
                worker = self._worker(state.config, self.config)
                state.workers.append(worker)
                self._spawn(Replica(self, state, worker).serve)
        self._spawn(upkeep.upkeep_loop, self)
        self._spawn(upkeep.lease_loop, self)

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.close()
        for state in self.models.values():
            for worker in state.workers:
                worker.kill()
        for t in self._threads:
            t.join(timeout=10)
        self.stores.close()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if the service stops meanwhile."""
        return self._stop.wait(seconds)

    def _spawn(self, target: Any, *args: Any) -> None:
        name = getattr(target, "__name__", "thread")
        t = threading.Thread(target=target, args=args, daemon=True, name=f"nnglass-{name}")
        t.start()
        self._threads.append(t)

    # --- requests --------------------------------------------------------------------------
    def submit(self, key_id: str, graph_json: bytes, tensors: bytes | None,
               queued: Callable[[], None] | None = None) -> Job:
        """Take a job in; `queued()` (its arrival's closer, arrivals.py) as soon as the queue
        has it, so that a pass its queueing wakes never waits for the rest of this call."""
        graph = wire.decode(graph_json, tensors, limits=self._wire_limits())
        state = self.models.get(graph.model)
        if state is None:
            raise NotFoundError(f"no model {graph.model!r} on this server; it serves "
                                f"{', '.join(sorted(self.models)) or 'none'}")
        policy = state.config.policy
        if state.lookups is None and not (policy.weights_visible or policy.expose_embeddings):
            # Which sites reveal the weights is known once a replica has loaded them.
            raise UnavailableError(f"model {graph.model!r} is still loading; try again in a few seconds")
        for trace in graph.children if graph.mode == SESSION else [graph]:
            check_prompts(trace)  # the layout every later check and the worker rely on (422)
        check_policy(graph, policy, state.paths or state.paths_from_config(), state.lookups)
        job = Job(key_id=key_id, model=graph.model, mode=graph.mode, status=JobStatus.QUEUED)
        job.queued_at = job.created_at
        share = share_of(graph)
        try:
            # The quota check and the queueing are one step per key; with PostgreSQL the
            # check, the row, the queue row and the NOTIFY are one transaction (stores.py).
            with self.scheduler.hold(key_id):
                if self.scheduler.queued_by(key_id) >= self.config.max_queued_per_key:
                    raise QuotaError(f"this key already has {self.config.max_queued_per_key} jobs waiting; "
                                     "wait for some to finish")
                # The graph first, then the row: a row always has its graph (recovery relies on it).
                self.results.save_graph(job.id, graph_json, tensors)
                job = self.jobs.create(job)
                self._note(job.id, graph, share)  # before a replica can take it
                self.scheduler.submit(graph.model, key_id, job.id, share=share, cost=cost_of(graph))
                if queued is not None:
                    queued()
                self.hub.publish(job.id)  # a live view of all this key's jobs learns of it now
        except (UnavailableError, OSError) as e:
            self._forget(job.id)
            with contextlib.suppress(OSError, UnavailableError):
                self.results.delete(job.id)  # not accepted: leave nothing behind
            if isinstance(e, OSError):  # a full disk: the server's trouble, for now
                raise UnavailableError(f"the server cannot store a job now ({why_not_stored(e)}); "
                                       "try again later") from None
            raise
        self.count("jobs_submitted_total")
        return job  # not read back: once the row exists the job is accepted, locked database or not

    def _note(self, job_id: str, graph: Any, share: Any) -> None:
        """What this process keeps of a job it queued, until it ends (`job_ended`)."""
        with self._lock:
            if share is not None and share.key.startswith(GENERATION):
                self._generating.add(job_id)
            self._prompt_tokens[job_id] = prompt_tokens(graph)
            if share is not None:
                self._padded[job_id] = (share.rows, share.width)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._generating.discard(job_id)
            self._prompt_tokens.pop(job_id, None)
            self._padded.pop(job_id, None)

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
        self.finish(job.id, JobStatus.CANCELLED, retry=False)
        self.scheduler.cancel(job.model, job.id)
        self._forget(job.id)
        state = self.models[job.model]
        worker = state.running.get(job.id)
        if worker is not None:
            self._halt(state, worker, job.id)
        self.publish_queue(job.model)
        return self.get(key_id, job_id)

    @staticmethod
    def _halt(state: ModelState, worker: Worker, job_id: str) -> None:
        """A cancelled job that runs here: a job alone stops its worker (its thread sees
        the worker die and restarts it); one in a generation session is dropped at its next
        step, and one in a shared pass has its answer dropped: the others go on, and the
        worker lives. One whose worker does not have it yet (replica._begin) never goes to
        it. CANCELLED stays either way."""
        if job_id in state.sharing or not worker.stop_job(job_id):
            state.dropping.add(job_id)

    def release(self, job_id: str) -> None:
        """A replica took a job it cannot run now (its worker died meanwhile): back to the
        queue, for the model's other replicas (it runs alone: its sharing is forgotten)."""
        job = self.durably(self.jobs.get, job_id)
        if job is not None and job.status == JobStatus.QUEUED:
            self.scheduler.release(job)

    def open_result(self, key_id: str, job_id: str) -> tuple[BinaryIO, int]:
        """The caller's job's result, as a stream, and its size in bytes."""
        job = self.get(key_id, job_id)
        size = job.result_bytes if job.status == JobStatus.COMPLETED else None  # the worker's count
        if size is None:
            raise NotFoundError(f"job {job_id} has no result ({job.status.value.lower()})")
        try:
            return self.results.open(job.id), size
        except FileNotFoundError:  # expired between the two reads
            raise NotFoundError(f"job {job_id} has no result (expired)") from None

    def _changed(self, job_id: str) -> None:
        """A job changed, maybe on another frontend: one cancelled there while it runs
        here is stopped here as `cancel` stops it (`_stop`)."""
        for state in self.models.values():
            worker = state.running.get(job_id)
            if worker is not None and job_id not in state.dropping:
                try:
                    job = self.jobs.get(job_id)
                except UnavailableError:  # cannot tell now; the cancel's own frontend retries nothing
                    return
                if job is not None and job.status == JobStatus.CANCELLED:
                    self._halt(state, worker, job_id)

    def status(self, job: Job, positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The job as the API shows it; `positions`: its model's queue, if already read."""
        out: dict[str, Any] = {
            "id": job.id, "model": job.model, "status": job.status.value, "created_at": job.created_at,
            "queued_at": job.queued_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "expires_at": job.expires_at, "result_bytes": job.result_bytes,
        }
        if job.status == JobStatus.QUEUED:
            queue = self.scheduler.positions(job.model) if positions is None else positions
            out["position"] = queue.get(job.id, 0)
        if job.error:
            out["error"] = job.error
        return out

    def models_info(self) -> list[dict[str, Any]]:
        return [s.info(self.scheduler.depth(name), self.config.debug_checksums)
                for name, s in self.models.items()]

    def pass_tokens(self, job_ids: list[str]) -> int:
        """Padded tokens of a pass of these jobs: all rows times the widest width."""
        with self._lock:
            shapes = [self._padded.get(j, (1, 1)) for j in job_ids]
        return sum(r for r, _ in shapes) * max(w for _, w in shapes)

    def step_line(self, line: dict[str, Any]) -> None:
        """A step line of a job a worker here runs: for the streams here, and elsewhere."""
        self.steps.add(line)
        self.hub.relay.export(line)

    def generates(self, job_id: str, request: dict[str, Any] | None = None) -> bool:
        """Whether a job can join a generation session (server/generation.py): known for
        a job queued here; for a generate job queued by another frontend (or queued again
        at a restart), its request's graph says, so that it too is dropped from its batch
        at a cancel instead of stopping a worker that runs it alone."""
        with self._lock:
            if job_id in self._generating:
                return True
        if request is None or not request.get("steps"):  # (steps: a generate job, replica._begin)
            return False
        try:
            tensors = request.get("tensors")
            graph = wire.decode(Path(request["graph"]).read_bytes(),
                                Path(tensors).read_bytes() if tensors else None, limits=self._wire_limits())
        except Exception:  # its worker gives the reason: it runs alone
            return False
        return generation_key(graph) is not None

    def job_ended(self, state: ModelState, job_id: str) -> None:
        """A worker finished a job (for `jobs_last_minute`, `prompt_tokens_per_s`)."""
        with self._lock:
            self._padded.pop(job_id, None)
            self._generating.discard(job_id)
            tokens = self._prompt_tokens.pop(job_id, 0)  # 0: queued before a restart
            state.ended_one(tokens)
            self.counters["prompt_tokens_total"] = self.counters.get("prompt_tokens_total", 0) + tokens

    def finish(self, job_id: str, status: JobStatus, *, retry: bool = True,
               store: Callable[[], None] | None = None, **fields: Any) -> None:
        """The job's final status. `retry`: wait out a locked database (background threads,
        which must not lose it); else a locked database raises UnavailableError. `store`:
        what must be stored before anyone can see the status (a result), in the same
        transaction where the stores share a database (a small result commits with it);
        what it raises (OSError: a full disk) is raised with nothing written."""
        now = clock.now()
        fields.update(status=status.value, finished_at=now, expires_at=now + self.config.result_ttl_s)

        def write() -> bool:
            with self.stores.together():  # the result, the status and its NOTIFY: one transaction
                if store is not None:
                    store()
                done = self.jobs.update(job_id, **fields)
                self.hub.publish(job_id)
            return bool(done)

        if self.durably(write) if retry else write():
            self.count(f'jobs_finished_total{{status="{status.value}"}}')

    def durably(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

    def publish_queue(self, model: str, started: list[str] | tuple[str, ...] = ()) -> None:
        """Tell the waiters of jobs that just `started`, and of those still queued (their
        positions moved): one transaction with PostgreSQL."""
        try:
            with self.stores.together():
                self.hub.publish_many([*started, *self.scheduler.positions(model)])
        except UnavailableError:  # the queued ones' waiters re-read on their own timeout
            self.hub.publish_many(list(started))  # (a hub that cannot send delivers here)

    def statuses(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """`status` of each, each model's queue read once (a page of N queued jobs is one
        query of the queue, not N), in one transaction."""
        with self.stores.together():
            models = {job.model for job in jobs if job.status == JobStatus.QUEUED}
            queues = {model: self.scheduler.positions(model) for model in models}
            return [self.status(job, queues.get(job.model)) for job in jobs]

    def job_status(self, key_id: str, job_id: str) -> dict[str, Any]:
        """`status(get(...))`. Not one transaction: a job that starts between the two reads
        shows QUEUED at position 0 for that once, and an event stream reads this at every
        change (with PostgreSQL, BEGIN and COMMIT would triple its round trips)."""
        return self.status(self.get(key_id, job_id))

    def expire(self, now: float) -> None:
        """Results whose time is up by `now` go; the jobs' records stay (their status still
        answers). A download already streaming one from a folder reads to its end (the open
        file outlives its name); one that starts after is a 404."""
        for job in self.jobs.expired(now):
            self.results.delete(job.id)
            self.jobs.update(job.id, expires_at=None, result_bytes=None)

    # --- metrics ---------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def metrics(self) -> str:
        lines = [f"nnglass_{name} {value}" for name, value in sorted(self.counters.items())]
        for name, s in self.models.items():
            lines.extend(s.metric_lines(self.scheduler.depth(name)))
        return "\n".join(lines) + "\n"

    def _wire_limits(self) -> WireLimits:
        return WireLimits(max_json_bytes=self.config.max_request_bytes,
                          max_tensor_bytes=self.config.max_request_bytes)
