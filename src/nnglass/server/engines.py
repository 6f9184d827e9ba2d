"""Which `Worker` a replica gets: one factory per `[server] engine`, picked once from the
config, so the service and the replica loop never ask which kind they hold."""

from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig, ServerConfig
from .handle import WorkerHandle
from .replica import Worker

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
