"""A rank group on Ray (`engine = "ray"`): the model's replica actor is rank 0, in bundle
0 of the replica's placement group; it creates ranks 1..N-1 as actors in the other
bundles (`RankActor`), so the group spans whatever nodes the placement strategy gives
(`shard_placement`: STRICT_SPREAD puts one rank on each node). `RayPeers` is rank 0's
side of them: the same `Peers` protocol as the embedded group's pipes.

Invariants:
- The ranks meet at rank 0's node address (a TCPStore there) and talk gloo (nccl on
  GPUs: written, untested here) over the addresses the nodes advertise; nothing listens
  beyond what Ray's own nodes do.
- The other ranks are owned by rank 0 (not detached): Ray ends them when it ends, so a
  killed replica never leaves ranks behind. Graphs reach them as bytes, as a replica's do.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .lockstep import GroupBroken, ShardedLanguageModel, error_dict, follow_run, read_run

logger = logging.getLogger(__name__)


class RankActor:
    """Rank r > 0 of a group on Ray."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .follower import test_hook
        from .rank import load_rank, open_store

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.rank, self._test_hook = int(config["rank"]), test_hook
        store = open_store(config["host"], int(config["port"]), self.rank, int(config["world"]))
        self.lm = load_rank(config, self.rank, int(config["world"]), store)
        from ..graph.check import Limits

        self.limits = Limits(**config.get("limits", {}))
        self.graph: Any = None
        self.run: dict[str, Any] = {}

    def node(self) -> str:
        return ray.util.get_node_ip_address()

    def prepare(self, run: dict[str, Any], blobs: list[bytes]) -> dict | None:
        self.graph, self.run = None, run
        try:
            self._test_hook(self.rank)
            self.graph = read_run(run, blobs, self.limits)
        except Exception as e:
            return error_dict(e, self.rank)
        return None

    def go(self, go: bool) -> dict | None:
        graph, self.graph = self.graph, None
        if not go or graph is None:
            return None
        try:
            follow_run(self.lm, self.run, graph)
        except Exception as e:
            answer = error_dict(e, self.rank)
            if answer["broken"]:
                logger.error("rank %d: a collective failed (%s): leaving the group", self.rank, e)
                os._exit(1)
            return answer
        return None


_Rank = ray.remote(max_restarts=0)(RankActor)


class RayPeers:
    """Rank 0's side of ranks 1..N-1 as Ray actors."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self._runs: list[Any] = []

    def _get(self, refs: list[Any]) -> list[Any]:
        try:
            return ray.get(refs)
        except RayError as e:
            raise GroupBroken(f"a rank is gone ({type(e).__name__})") from None

    def prepare(self, run: dict[str, Any], blobs: list[bytes]) -> list[dict | None]:
        return self._get([a.prepare.remote(run, blobs) for a in self.actors])

    def start(self, go: bool) -> None:
        self._runs = [a.go.remote(go) for a in self.actors]

    def outcomes(self) -> list[dict | None]:
        runs, self._runs = self._runs, []
        return self._get(runs)

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except (RayError, ValueError):
                pass

    def nodes(self) -> list[str]:
        return self._get([a.node.remote() for a in self.actors])


def start_ray_group(config: dict[str, Any], placement_group: Any) -> ShardedLanguageModel:
    """Rank 0 (this actor, bundle 0) and ranks 1..N-1 in bundles 1..N-1."""
    import torch.distributed as dist

    from .rank import load_rank, open_store

    world = int(config["shards"])
    host = ray.util.get_node_ip_address()
    store = open_store(host, 0, 0, world)
    threads = int(config.get("threads") or 1)
    actors = [_Rank.options(num_cpus=threads, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group, placement_group_bundle_index=rank)).remote(
        {**config, "rank": rank, "world": world, "host": host, "port": store.port})
        for rank in range(1, world)]
    peers = RayPeers(actors)
    try:
        lm = load_rank({**config, "host": host}, 0, world, store)
        where = [host, *peers.nodes()]
    except BaseException:
        peers.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    logger.info("rank group of %s on nodes %s", config.get("name"), where)
    lm.attach(peers)
    object.__setattr__(lm, "_store", store)
    object.__setattr__(lm, "nodes", where)
    return lm
