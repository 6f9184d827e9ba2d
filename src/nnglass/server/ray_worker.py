"""The Ray `Worker`: each model replica is a Ray actor, on whichever node has the
resources its config asks for. The actor hosts the same model and the same request
handling as the worker subprocess (`worker.LoadedModel`, `worker.answer`); this file
adds only the transport.

Invariants:
- The actor never needs this process's disk: a request carries its graph as bytes
  (`graph_data`, `tensor_data`, read here from the paths the replica loop gave) and a
  COMPLETED answer carries its result as bytes (`data`), which the replica loop puts in
  the service's ResultStore. Ray moves both (through its object store when large);
  neither holds anything a client sent besides those bytes, which the actor decodes
  with the same checked wire codec as the subprocess.
- One request in flight per worker; an answer comes within the timeout, or the actor is
  killed (`ray.kill`), exactly as the subprocess is: a timeout or the actor's death (a
  crash, `ray.kill` from outside, the out-of-memory killer, its node lost) is an ERROR
  answer and leaves the worker dead until `start()`. The replica loop restarts it; a
  restarted actor waits for a node with the resources (a lost node that rejoins gets its
  replicas back). Ray itself never restarts it (`max_restarts=0`), so a job never runs
  on an actor the replica loop has not seen start.
- `alive` is cheap and sees a death while idle: each actor runs a `watch` call that never
  returns, in a second thread (`max_concurrency=2`); its reference resolves only when the
  actor dies, and its future (`ObjectRef.future()`, completed by Ray's own callback) says
  so without a call into Ray (a `ray.wait` cost ~0.5 ms, three times a job).
- Actors are owned by this process (not detached): if the API process dies, its replicas
  die with it, as its subprocesses would.
- Step lines (server/steps.py) of a generating job wait in the actor (`take`, a third
  thread: `max_concurrency=3`) until `run`'s caller takes them, while the request runs and
  once more after it answers, so each reaches `on_step` before the answer is returned, as
  from a subprocess. The actor holds at most MAX_WAITING of them (the oldest go: a reader
  sees a gap and reads the result).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from ..errors import NNglassError
from .config import ModelConfig, ServerConfig
from .fault_hooks import TEST_CRASH, TEST_GATE, TEST_HANG
from .handle import error_answer

__all__ = ["RayWorker", "connect", "ray_worker"]

logger = logging.getLogger(__name__)

NAMESPACE = "nnglass"
_FORWARDED = (TEST_HANG, TEST_CRASH, TEST_GATE)  # tests only: the hooks reach the actor as a child
MAX_WAITING = 4096  # step lines an actor holds for the server (steps.JOB_STEPS per job)
TAKE_WAIT_S = 0.2  # how long one `take` waits for a line
_RAY_ARGS = ("num_cpus", "num_gpus", "memory")  # resource names that are Ray's own arguments
_connect_lock = threading.Lock()


class ReplicaHost:
    """The actor: one loaded model answering requests (see `worker.answer`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(var, "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from .worker import LoadedModel

        self.model = LoadedModel(config)
        self._lines: deque[dict[str, Any]] = deque(maxlen=MAX_WAITING)
        self._arrived = threading.Condition()

    def ready(self) -> dict[str, Any]:
        from .worker import ready_message

        ranks = self.model.rank_nodes  # a rank group: each rank's node
        return {**ready_message(self.model), "node": ray.util.get_node_ip_address(),
                **({"rank_nodes": ranks} if ranks else {})}

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        from .worker import answer

        self.model.outbox.clear()
        reply = answer(self.model, request, send=self._keep)
        for one in reply["batch"] if type(reply.get("batch")) is list else [reply]:
            data = self.model.outbox.pop(one.get("job"), None)
            if data is not None and one.get("status") == "COMPLETED":
                one["data"] = data
        return reply

    def _keep(self, line: dict[str, Any]) -> None:
        with self._arrived:
            self._lines.append(line)
            self._arrived.notify_all()

    def take(self, wait: float) -> list[dict[str, Any]]:
        """The step lines made since the last take, waiting up to `wait` s for one."""
        with self._arrived:
            self._arrived.wait_for(lambda: bool(self._lines), timeout=wait)
            lines = list(self._lines)
            self._lines.clear()
        return lines

    def watch(self) -> None:
        """Never returns: its reference resolves (with an error) when the actor dies."""
        threading.Event().wait()


_Host = ray.remote(max_restarts=0, max_concurrency=3)(ReplicaHost)


def connect(server: ServerConfig) -> None:
    """Join the Ray cluster at `server.ray_address` once per process (as a driver: the
    token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as for any Ray client)."""
    with _connect_lock:
        if ray.is_initialized():
            return
        ray.init(address=server.ray_address, namespace=NAMESPACE, _node_ip_address=server.ray_node_ip or None,
                 configure_logging=False, log_to_driver=False)
        logger.info("joined the Ray cluster at %s", server.ray_address)


def actor_options(model: ModelConfig) -> dict[str, Any]:
    """Ray's scheduling options for one replica of `model` (its `resources` table;
    num_cpus defaults to the torch threads it uses)."""
    asked = {"num_cpus": model.threads, **model.resources}
    options: dict[str, Any] = {k: asked.pop(k) for k in _RAY_ARGS if k in asked}
    if "memory" in options:
        options["memory"] = int(options["memory"])  # bytes
    if asked:
        options["resources"] = asked
    env = {var: os.environ[var] for var in _FORWARDED if os.environ.get(var)}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def ray_worker(model: ModelConfig, server: ServerConfig) -> RayWorker:
    """The `engine = "ray"` worker factory (see service.WorkerFactory)."""
    connect(server)
    config = {"name": model.name, "source": model.source, "dtype": model.dtype, "attention": model.attention,
              "threads": model.threads, "debug_checksums": server.debug_checksums, "shards": model.shards,
              "device_map": model.device_map, "join_tokens": model.join_tokens}
    options = actor_options(model)
    if model.shards == 1:
        return RayWorker(config, options)
    # A rank group: one bundle per rank (rank 0, this replica's actor, in bundle 0).
    bundle = {"CPU": float(options.get("num_cpus", model.threads))}
    if options.get("num_gpus"):
        bundle["GPU"] = float(options["num_gpus"])
    return RayWorker(config, options, bundles=[bundle] * model.shards, strategy=model.shard_placement)


class RayWorker:
    """The server's side of one replica actor (the `Worker` protocol of engines.py)."""

    def __init__(self, model_config: dict[str, Any], options: dict[str, Any],
                 bundles: list[dict[str, float]] | None = None, strategy: str = "PACK") -> None:
        self.config, self.options = dict(model_config), dict(options)
        self.bundles, self.strategy = bundles, strategy  # a rank group's placement group
        self._group: Any = None
        self.paths: list[str] = []
        self.ready: dict[str, Any] = {}
        self._actor: Any = None
        self._watch: Any = None
        self._watched: Future[Any] | None = None  # the watch's future: done once the actor died
        self._lock = threading.Lock()  # one request in flight
        self._jobs_lock = threading.Lock()  # guards _jobs and the kill stop_job makes
        self._jobs: frozenset[Any] = frozenset()
        self._dead = True

    @property
    def alive(self) -> bool:
        watched = self._watched
        return not (self._dead or watched is None or watched.done())

    @property
    def actor(self) -> Any:
        """The actor handle (tests kill it from outside), None while dead."""
        return self._actor

    def start(self, timeout: float = 300.0) -> None:
        """Create the actor and wait until its model is loaded; raise NNglassError if not.
        The wait includes waiting for a node with the resources asked for."""
        self.kill()
        name = self.config.get("name")
        # Named (in the "nnglass" namespace) so an operator can find and watch each replica.
        self.options["name"] = f"{name}-{uuid.uuid4().hex[:12]}"
        config = self.config
        if self.bundles:
            try:
                config = {**config, "placement_group": self._place(timeout)}
            except GetTimeoutError:
                self.kill()
                asked = f"{self.strategy}, {self.bundles[0]} each"
                raise NNglassError(f"no placement for the {len(self.bundles)} ranks of model {name!r} "
                                   f"({asked}) within {timeout:g} s") from None
        actor = _Host.options(**self.options).remote(config)
        self._actor = actor
        try:
            msg = ray.get(actor.ready.remote(), timeout=timeout)
        except GetTimeoutError:
            self.kill()
            raise NNglassError(f"worker for model {name!r} did not load within {timeout:g} s (no node "
                               f"has the resources {self.options}, or the model is slow to load)") from None
        except RayError as e:
            self.kill()
            raise NNglassError(f"worker for model {name!r} failed to start: {_reason(e)}") from None
        self.ready, self.paths = msg, list(msg["paths"])
        self._watch = actor.watch.remote()
        self._watched, self._dead = self._watch.future(), False
        logger.info("worker for model %r ready (pid %s) on Ray node %s as %s", name, msg["pid"], msg["node"],
                    self.options["name"])
        if msg.get("rank_nodes"):
            logger.info("ranks of model %r on Ray nodes %s", name, " ".join(msg["rank_nodes"]))

    def stream(self, requests: list[dict[str, Any]], on_step: Any, timeout: float,
               on_line: Any = None, beside: Any = None) -> dict[str, Any] | None:
        """A generation session, as whole requests: an actor answers one request at a time,
        so nothing runs beside its batch (`beside` is never asked): the jobs taken at a
        boundary ride in the next whole request, as they did before jobs ran beside."""
        from .generation import stream_by_batches

        return stream_by_batches(self, requests, on_step, timeout, on_line)

    def _place(self, timeout: float) -> Any:
        """The rank group's placement group, ready; the replica's actor goes in bundle 0."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._group = placement_group(self.bundles, strategy=self.strategy)
        ray.get(self._group.ready(), timeout=timeout)
        self.options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self._group, placement_group_bundle_index=0)
        self.options.pop("resources", None)  # the bundle holds what the rank asks for
        return self._group

    def run(self, request: dict[str, Any], timeout: float | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send one job (or a {"batch": [...]}); return its answer. Past `timeout` the
        actor is killed. `on_step`: its jobs' step lines, taken from the actor meanwhile."""
        job = request.get("job")
        with self._lock:
            if not self.alive:
                return error_answer(job, "ExecutionError", "the worker is not running (restart it)")
            batch = request.get("batch")
            jobs = [r.get("job") for r in batch] if type(batch) is list else [job]
            try:
                carried = {"batch": [_carry(r) for r in batch]} if type(batch) is list else _carry(request)
            except OSError as e:  # this machine's store, not the actor: it stays up
                return error_answer(job, "ExecutionError", f"the job's graph could not be read: {e}")
            with self._jobs_lock:
                self._jobs = frozenset(j for j in jobs if j is not None)
            try:
                deadline = None if timeout is None else time.monotonic() + timeout
                ref = self._actor.run.remote(carried)
                generating = any(r.get("steps") for r in (batch if type(batch) is list else [request]))
                if on_step is not None and generating:  # (only generate jobs make step lines)
                    self._pump(ref, on_step, deadline)
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                return ray.get(ref, timeout=left)
            except GetTimeoutError:
                self.kill()
                message = f"time limit: the worker was stopped after {timeout:g} s"
                return error_answer(job, "TimeLimitError", message)
            except RayActorError as e:
                self.kill()
                return error_answer(job, "ExecutionError", f"the worker crashed ({_reason(e)})")
            except RayError as e:  # nothing of a job's own failure: that is an answer
                self.kill()
                return error_answer(job, "ExecutionError", f"the worker failed: {type(e).__name__}: {e}")
            finally:
                with self._jobs_lock:
                    self._jobs = frozenset()

    def _pump(self, ref: Any, on_step: Callable[[dict[str, Any]], None], deadline: float | None) -> None:
        """The request's step lines to `on_step` until it answers (and those made last)."""
        actor = self._actor
        while True:
            done = bool(ray.wait([ref], timeout=0)[0])
            if deadline is not None and time.monotonic() > deadline:
                return
            try:
                lines = ray.get(actor.take.remote(0 if done else TAKE_WAIT_S), timeout=TAKE_WAIT_S + 30)
            except RayError:
                return  # the actor died (the answer says so) or is stuck: no more lines
            for line in lines:
                if line.get("job") in self._jobs:
                    on_step(line)
            if done:
                return

    def stop_job(self, job: Any) -> bool:
        """Kill the actor if `job` is in the request it runs now; True if it was."""
        with self._jobs_lock:
            if job not in self._jobs:
                return False
            self.kill()
            return True

    def kill(self) -> None:
        """Stop the actor now; the worker is dead until start()."""
        self._dead = True
        actor, self._actor, self._watch, self._watched = self._actor, None, None, None
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)  # its other ranks are its own actors: they go too
            except (RayError, ValueError) as e:  # already gone
                logger.debug("ray.kill: %s", e)
        group, self._group = self._group, None
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(group)
            except (RayError, ValueError) as e:
                logger.debug("remove_placement_group: %s", e)


def _carry(request: dict[str, Any]) -> dict[str, Any]:
    """The request with its graph read in, and no path of this machine left in it."""
    out = {k: v for k, v in request.items() if k not in ("graph", "tensors", "result")}
    out["graph_data"] = Path(request["graph"]).read_bytes()
    out["tensor_data"] = Path(request["tensors"]).read_bytes() if request.get("tensors") else None
    return out


def _reason(e: RayError) -> str:
    """Ray's explanation of a death, first line (they run long)."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
