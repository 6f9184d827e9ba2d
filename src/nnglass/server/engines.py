"""The `Worker` protocol, and which one a replica gets: one factory per `[server] engine`,
picked once from the config, so the service and the replica loop never ask which kind
they hold (`handle.WorkerHandle`, a subprocess; `ray_worker.RayWorker`, a Ray actor)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .config import ModelConfig, ServerConfig
from .handle import WorkerHandle


class Worker(Protocol):
    """One model replica that runs job requests (the JSON protocol of `server/worker.py`)."""

    paths: list[str]  # the model's module paths, once ready
    ready: dict[str, Any]  # the whole ready message (paths, lookups, debug checksums)

    @property
    def alive(self) -> bool: ...

    def start(self, timeout: float = 300.0) -> None:
        """(Re)start and wait until the model is loaded; raise NNglassError if it is not."""

    def run(self, request: dict[str, Any], timeout: float | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """One request's answer; never raises for a job's failure (that is an ERROR answer).
        Past `timeout` the worker is stopped and the answer says so. `on_step`: the step
        lines of its jobs while they run, from a worker that can send them (else never)."""

    def stream(self, requests: list[dict[str, Any]], on_step: Callable[[dict[str, Any]], dict[str, Any]],
               timeout: float, on_line: Callable[[dict[str, Any]], None] | None = None,
               beside: Callable[[float], list[dict[str, Any]]] | None = None) -> dict[str, Any] | None:
        """A generation session (server/generation.py): `on_step` gets each step message and
        returns the reply (and each message of answers of jobs beside the batch: its reply
        unused); None when it ended, else the answer saying why it was lost. `beside(wait)`:
        jobs to run beside the batch now, asked (from a thread of the worker's) only by a
        worker that can run them so (the subprocess: server/beside.py); one that cannot
        (a Ray actor, a rank group) never asks, and the jobs the replica takes at a step
        boundary run in its next request or between two steps."""

    def stop_job(self, job: Any) -> bool:
        """Stop the worker if (and only if) it is running `job` now."""

    def kill(self) -> None: ...


WorkerFactory = Callable[[ModelConfig, ServerConfig], Worker]


def subprocess_worker(model: ModelConfig, server: ServerConfig) -> Worker:
    """The embedded default: each replica in a worker subprocess of this server."""
    return WorkerHandle({"name": model.name, "source": model.source, "dtype": model.dtype,
                         "attention": model.attention, "threads": model.threads,
                         "debug_checksums": server.debug_checksums,
                         "shards": model.shards, "device_map": model.device_map,
                         "join_tokens": model.join_tokens})


def ray_worker(model: ModelConfig, server: ServerConfig) -> Worker:
    """`engine = "ray"`: each replica a Ray actor on the cluster at `server.ray_address`."""
    from .ray_worker import ray_worker as make  # Ray is an optional dependency (the cluster extra)

    return make(model, server)


ENGINES: dict[str, WorkerFactory] = {"subprocess": subprocess_worker, "ray": ray_worker}


def configured_worker(model: ModelConfig, server: ServerConfig) -> Worker:
    """The worker `server.engine` names; the service never asks which one it holds."""
    return ENGINES[server.engine](model, server)
