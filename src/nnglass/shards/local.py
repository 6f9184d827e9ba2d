"""`LanguageModel(source, shards=N)` in a script: the model runs tensor-parallel in a
rank group of N processes, started on first use. Rank 0 is a worker subprocess of this
process (server/worker.py with `"shards": N`), so a local sharded run goes through the
very group a server runs: graphs go as wire bytes, saved values come back as a result
file, once.

Invariants:
- One run at a time per group. A job's failure raises the rank's error (the user's
  line kept); a group that died (a rank crashed, a collective failed) is restarted on
  the next run.
- The group dies with this process (its ranks watch their parents).
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from .. import errors
from ..errors import ExecutionError, NNglassError
from ..graph import wire
from ..graph.ir import Graph
from ..graph.results import decode_results
from ..runtime.limits import RunLimits
from .lockstep import BROKEN_EXIT

_JOBS = itertools.count()


class RankGroup:
    """The rank group of one local LanguageModel."""

    def __init__(self, name: str, source: Any, dtype: torch.dtype, shards: int, threads: int) -> None:
        from ..server.handle import WorkerHandle

        dtype_name = str(dtype).removeprefix("torch.")
        self.handle = WorkerHandle({"name": name, "source": str(source), "dtype": dtype_name,
                                    "threads": threads, "shards": shards})
        self._lock = threading.Lock()
        weakref.finalize(self, self.handle.kill)

    def run_graph(self, graph: Graph, limits: RunLimits) -> dict[int, Any]:
        with self._lock:
            if not self.handle.alive:
                self.handle.start()
            data, tensors = wire.encode(graph)
            with tempfile.TemporaryDirectory(prefix="nnglass-shards-") as tmp:
                folder = Path(tmp)
                (folder / "graph.json").write_bytes(data)
                if tensors is not None:
                    (folder / "graph.safetensors").write_bytes(tensors)
                job = f"local-{next(_JOBS)}"
                answer = self.handle.run({
                    "job": job, "graph": str(folder / "graph.json"),
                    "tensors": str(folder / "graph.safetensors") if tensors is not None else None,
                    "result": str(folder / "result"), "hide_weights": limits.hide_weights,
                    "limits": {"run_seconds": limits.seconds, "op_bytes": limits.op_bytes,
                               "live_bytes": limits.live_bytes}})
                if answer.get("status") != "COMPLETED":
                    raise _error(answer.get("error") or {})
                return decode_results((folder / "result").read_bytes())

    def close(self) -> None:
        self.handle.kill()


def _error(d: dict[str, Any]) -> NNglassError:
    cls = getattr(errors, str(d.get("type")), None)
    message = str(d.get("message"))
    if message.endswith(f"(exit code {BROKEN_EXIT})"):
        message += ": a rank of the group was lost; the group starts again on the next run"
    if not (isinstance(cls, type) and issubclass(cls, NNglassError)):
        cls, message = ExecutionError, f"{d.get('type')}: {message}"
    return cls(message, str(d.get("where") or ""))
