"""`ShardedLanguageModel`: a LanguageModel whose module is one rank's shard of a
tensor-parallel model. Rank 0 is the one a caller talks to; before each run it hands the
run (the graph as wire bytes, the limits, the grad mode) to the other ranks (`Peers`),
and every rank runs the same graph with the same interpreter.

Protocol, per top-level `run_graph` on rank 0:
  1. `peers.prepare(run)`: each other rank decodes the graph and says ok or its error
     (co-tenants' merged graph goes as the graphs it was merged from, merged again there).
  2. `peers.start(go)`: go only if every rank could decode it; otherwise the job fails
     on all ranks with the first rank's error, and no rank has started a collective.
  3. All ranks run; `peers.outcomes()`: each other rank's ok or error.
  The job's outcome is rank 0's error, else the first other rank's, else rank 0's values.

Invariants:
- The graph runs the same way on every rank: the same graph, limits and grad mode, no
  rank-dependent branch in the interpreter, so every rank makes the same collectives.
  Saves come back once, from rank 0; the other ranks drop theirs.
- A generation without a seed gets one (random, for this run), handed to every rank:
  sampling draws the same tokens everywhere.
- One run at a time per group (a lock on rank 0). A session's traces run inside the
  one handed-over run (`imports` set: every rank is already in it).
- A rank that dies or whose collective fails leaves the group unusable (its collectives
  are out of step): the group ends (`GroupBroken`; rank 0 exits) and its host restarts
  it, as for a crashed worker. A time limit that one rank reaches mid-forward is of this
  kind: the host's hard timeout stops the group.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import asdict, replace
from typing import Any, Protocol

import torch

from .. import errors
from ..errors import ExecutionError, NNglassError
from ..graph import wire
from ..graph.ir import GENERATE, SEED, Graph
from ..graph.source import split as split_source
from ..models.language import LanguageModel
from ..runtime.limits import NO_LIMITS, RunLimits
from ..runtime.shards import SiteLayouts

logger = logging.getLogger(__name__)

BROKEN_EXIT = 75  # rank 0's exit code when its group broke (its host restarts it)


class GroupBroken(NNglassError):
    """A rank of the group is gone or out of step: the group must be restarted."""


class Peers(Protocol):
    """Rank 0's side of the other ranks (pipes to subprocesses, or Ray actors)."""

    def prepare(self, run: dict[str, Any], blobs: list[bytes]) -> list[dict | None]:
        """Each other rank decodes the run (its graphs: wire JSON, tensors or b"", in turn):
        its error (`error_dict`) or None."""

    def start(self, go: bool) -> None: ...

    def outcomes(self) -> list[dict | None]:
        """Each other rank's error in the run it started, or None."""

    def close(self) -> None: ...


def error_dict(e: BaseException, rank: int) -> dict[str, Any]:
    message = e.message if isinstance(e, NNglassError) else str(e)
    return {"type": type(e).__name__, "message": message, "where": getattr(e, "where", ""),
            "node_id": getattr(e, "node_id", None), "rank": rank,
            "broken": _is_collective_error(e)}


def rebuild_error(d: dict[str, Any]) -> NNglassError:
    """Another rank's error, raised on rank 0: the same class where it is one of ours."""
    cls = getattr(errors, str(d.get("type")), None)
    message = f"on rank {d.get('rank')}: {d.get('message')}"
    if d.get("broken"):
        cls = GroupBroken
    elif not (isinstance(cls, type) and issubclass(cls, NNglassError)):
        cls, message = ExecutionError, f"on rank {d.get('rank')}: {d.get('type')}: {d.get('message')}"
    e = cls(message, str(d.get("where") or ""))
    e.node_id = d.get("node_id")  # type: ignore[attr-defined]  # a shared pass finds whose job it was
    return e


def _is_collective_error(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, (dist.DistError, GroupBroken))


def first(answers: list[dict | None]) -> dict | None:
    return next((a for a in answers if a is not None), None)


class ShardedLanguageModel(LanguageModel):
    """One rank's LanguageModel on a tensor-parallel module. `peers`: set on rank 0 only."""

    def __init__(self, model: torch.nn.Module, *, tokenizer: Any, name: str | None, sites: SiteLayouts,
                 lookups: frozenset, rank: int) -> None:
        super().__init__(model, tokenizer=tokenizer, name=name)
        object.__setattr__(self, "_sites", sites)
        object.__setattr__(self, "lookups", lookups)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "peers", None)
        object.__setattr__(self, "nodes", ())  # each rank's node, where the group knows them
        object.__setattr__(self, "_run_lock", threading.Lock())

    def attach(self, peers: Peers) -> None:
        object.__setattr__(self, "peers", peers)

    def run_graph(self, graph: Graph, imports: dict | None = None,
                  limits: RunLimits = NO_LIMITS, on_step: Any = None) -> dict[int, Any]:
        # on_step (runtime/steps.py) is not called: a rank group reports no steps, and a stream
        # of its generation takes the result (server/steps.py).
        if imports is not None or self.peers is None:  # inside a handed-over run, or a follower
            return super().run_graph(graph, imports, limits)
        with self._run_lock:
            try:
                return self._lead(graph, limits)
            except GroupBroken:
                logger.error("the rank group is broken: rank 0 exits so that its host restarts it")
                self.peers.close()
                os._exit(BROKEN_EXIT)

    def _lead(self, graph: Graph, limits: RunLimits) -> dict[int, Any]:
        for node in (n for g in (graph, *graph.children) for n in g.nodes):
            if node.site is not None and split_source(node.site.path) is not None:
                # Inside a sharded forward an operation sees this rank's heads only.
                raise errors.GraphError("`.source` operations are not available on a tensor-parallel "
                                        "model (each rank computes its own heads); run it unsharded",
                                        node.where)
        if graph.mode == GENERATE and graph.options.get(SEED) is None:
            # Sampling must draw the same tokens on every rank, or their forwards diverge.
            graph = replace(graph, options={**graph.options, SEED: secrets.randbits(62)})
        parts = graph.merged_from or [graph]  # co-tenants: the others merge them again
        blobs = [b for g in parts for b in _wire(g)]
        run = {"limits": asdict(limits), "grad": torch.is_grad_enabled(),
               "merged": graph.merged_from is not None}
        refused = first(self.peers.prepare(run, blobs))
        self.peers.start(refused is None)
        if refused is not None:
            raise rebuild_error(refused)
        mine: BaseException | None = None
        try:
            values = super().run_graph(graph, limits=limits)
        except Exception as e:
            mine = e
        failed = first(self.peers.outcomes())
        if failed is not None and (failed.get("broken") or mine is None):
            raise rebuild_error(failed)
        if mine is not None:
            if _is_collective_error(mine):
                raise GroupBroken(f"on rank 0: {mine}") from mine
            raise mine
        return values


def _wire(graph: Graph) -> tuple[bytes, bytes]:
    data, tensors = wire.encode(graph)
    return data, tensors or b""


def read_run(run: dict[str, Any], blobs: list[bytes], limits: Any) -> Graph:
    """A follower's graph of a handed-over run: decoded (and merged again for co-tenants)."""
    from ..graph.merge import merge
    from ..graph.ops import REGISTRY

    graphs = [wire.decode(blobs[k], blobs[k + 1] or None, registry=REGISTRY, limits=limits)
              for k in range(0, len(blobs), 2)]
    return merge(graphs)[0] if run.get("merged") else graphs[0]


def follow_run(lm: ShardedLanguageModel, run: dict[str, Any], graph: Graph) -> None:
    """A follower's side of one handed-over run (its values are dropped: rank 0 has them)."""
    with torch.set_grad_enabled(bool(run.get("grad"))):
        lm.run_graph(graph, limits=RunLimits(**run.get("limits", {})))
