"""One model replica in its own process, so a crash is contained and a time limit can
really stop the work. `python -m nnglass.server.worker` is the child; `WorkerHandle`
(handle.py, re-exported here) is the server's side of it. `LoadedModel`, `ready_message`
and `answer` are the replica itself, whatever hosts it (this child, or a Ray actor).

Protocol: JSON lines over the child's stdin/stdout, never pickle, never tensors.
  parent → child, once: {"name", "source", "dtype", "threads", "debug_checksums"[, "attention", "limits"]
                          [, "shards": N: this child is rank 0 of N tensor-parallel ranks, shards/]
                          [, "join_tokens": the most prompt tokens joining a generation per step]}
  child → parent:       {"ready": true, "paths": [...], "operations": [...], "lookups": [[path, kind], ...],
                         "pid": n, "beside": bool} (operations: the `.source` paths a forward makes,
                         exposure.py; beside: it runs jobs beside a generation, server/beside.py)
                        or {"ready": false, "error": {...}} (then it exits)
  parent → child, a job: {"job", "graph": path, "tensors": path | null, "result": path,
                          "limits": {"run_seconds", "result_bytes", "op_bytes", "live_bytes", ...},
                          "hide_weights": bool}
  child → parent, while a job with "steps": true generates (server/steps.py), per step:
                        {"job", "step": k, "tokens": [[id], ...], "values": base64 | absent,
                         "dropped": true | absent}
  child → parent:       {"job", "status": "COMPLETED", "bytes": n}
                        or {"job", "status": "ERROR", "error": {"type", "message", "where"}}
  parent → child, several jobs sharing one forward pass (co-tenancy): {"batch": [job, ...]}
  child → parent:       {"batch": [answer, ...]}, one answer a job, in order
  Generate jobs in a batch run as one continuous generation (runtime/decode_batch.py); the
  first answer then carries "steps": [[rows, seconds, kind], ...], one per shared forward.
  parent → child, a generation session that jobs join while it runs: {"stream": [job, ...]},
  then step messages and replies in lockstep (server/generation.py states them), and, at
  any moment, {"beside": [job, ...]}: jobs to run beside the batch (server/beside.py).
  With debug_checksums, "ready" and every answer also carry "checksum" (sha256 over all
  parameters and buffers) and "has_grad" (whether any parameter holds a `.grad`).
  EOF on stdin: the child exits 0.
  A host on another machine (server/ray_worker.py) calls `answer` with the same requests,
  except that they carry the graph (`graph_data`, `tensor_data`: bytes) instead of its
  paths and have no `result` path: each COMPLETED answer's result is then in
  `LoadedModel.outbox[job]` for the host to send back. A host that cannot send lines
  while a job runs passes no `send`: its jobs make no step lines (a Ray actor keeps them
  for the server to take while the job runs, server/ray_worker.py).

Invariants:
- The child's stdout carries protocol lines only: fd 1 is pointed at stderr before any
  model code runs and `_send` writes to a private duplicate, so a stray print (ours, a
  library's, a progress bar, C code) cannot corrupt the pipe.
- A job's failure is an ERROR answer, never a dead worker. A result file appears whole
  (tmp + os.replace) or not at all; one over `result_bytes` is refused, not written.
- A graph runs under `torch.no_grad()` unless it (or a session child) holds a backward
  node; the runtime never changes weights or leaves `.grad` (debug_checksums checks it).
- Test hooks (hang, crash, step gate) are in server/fault_hooks.py.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import GraphError, NNglassError, PolicyError, RemoteError
from ..graph import wire
from ..graph.check import DTYPES, Limits
from ..graph.ir import BACKWARD, SESSION, Graph
from ..graph.merge import merge, share_key, split
from ..graph.ops import REGISTRY
from ..graph.results import encode_results
from ..models.batched_generate import generation_key
from ..runtime.limits import RunLimits
from .beside import Inbox, Lane
from .exposure import lookup_sites, operation_sites
from .fault_hooks import TEST_CRASH as TEST_CRASH
from .fault_hooks import TEST_GATE as TEST_GATE
from .fault_hooks import TEST_HANG as TEST_HANG
from .fault_hooks import crash_or_hang, gated_sender
from .generation import run_session
from .handle import GRACE_SECONDS as GRACE_SECONDS
from .handle import WorkerHandle as WorkerHandle
from .handle import error_answer
from .results import why_not_stored
from .steps import step_sender

logger = logging.getLogger(__name__)
Send = Callable[[dict[str, Any]], None]  # a protocol line to the server, while a job runs


# --- child ----------------------------------------------------------------------------


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter's and buffer's name and bytes, in module order."""
    h = hashlib.sha256()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        h.update(name.encode())
        t = t.to_local() if hasattr(t, "to_local") else t  # a tensor-parallel rank: its own shard
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def has_backward(graph: Graph) -> bool:
    return any(n.op == BACKWARD for g in (graph, *graph.children) for n in g.nodes)


def _error(job: Any, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, NNglassError):
        return error_answer(job, type(exc).__name__, exc.message, exc.where)
    return error_answer(job, type(exc).__name__, str(exc))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LoadedModel:
    """The loaded model and what a job needs to run on it."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ..models.language import LanguageModel

        self.name: str = config["name"]
        self.debug = bool(config.get("debug_checksums", False))
        self.limits = Limits(**config.get("limits", {}))
        dtype = config.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        torch.set_num_threads(int(config["threads"]))
        # A rank group measures the lookup sites on every rank at load (a forward on rank 0
        # alone would wait for the others forever); rank_nodes: where its ranks run.
        self.lookups: frozenset | None = None
        self.rank_nodes: list[str] = []
        if int(config.get("shards") or 1) > 1:  # tensor-parallel: this process is rank 0 of a group
            from ..shards.start import start_group

            self.lm = start_group(config)
            self.lookups, self.rank_nodes = self.lm.lookups, list(self.lm.nodes)
        else:
            placed = {"device_map": config["device_map"]} if config.get("device_map") else {}
            if config.get("attention"):  # e.g. "eager": `.source` sees the probabilities
                placed["attn_implementation"] = config["attention"]
            self.lm = LanguageModel(config["source"], dtype=DTYPES[dtype], name=self.name, **placed)
        self.module = self.lm.module  # load the weights now, not on the first job
        self.outbox: dict[Any, bytes] = {}  # job -> its result, for a request without a result path
        # The most padded prompt tokens that join a generation session's batch in one step.
        self.join_tokens: int | None = config.get("join_tokens")

    def debug_info(self) -> dict[str, Any]:
        if not self.debug:
            return {}
        has_grad = any(p.grad is not None for p in self.module.parameters())
        return {"checksum": weights_checksum(self.module), "has_grad": has_grad}

    def job(self, request: dict[str, Any], send: Send | None = None) -> dict[str, Any]:
        """One job's answer; `send` (a host that can send lines meanwhile): its step lines."""
        job = request.get("job")
        try:
            answer = {"job": job, "status": "COMPLETED", "bytes": self._run(job, request, send)}
        except Exception as e:  # a job's failure is its answer, never the worker's end
            logger.info("job %s failed: %s: %s", job, type(e).__name__, e)
            answer = _error(job, e)
        return {**answer, **self.debug_info()}

    def batch(self, requests: list[dict[str, Any]], send: Send | None = None) -> dict[str, Any]:
        """Co-tenancy: several jobs' graphs merged into one forward pass. A job whose node
        fails the shared run is taken out and runs alone (its own error, or its result if
        only the batch made it fail: the strictest limits, the sum of everyone's bytes);
        the others run again, shared. When the failing job is unknown (or the graphs
        cannot share a pass), each job runs alone: one job's failure is never another's.
        `send`: generate jobs' step lines, as for `job`."""
        return {"batch": self._shared(requests, send), **self.debug_info()}

    def _shared(self, requests: list[dict[str, Any]], send: Send | None = None) -> list[dict[str, Any]]:
        if len(requests) == 1:
            return [self.job(requests[0], send)]
        try:
            graphs = [self._load(r) for r in requests]
            generation = {generation_key(g) for g in graphs}
            jobs = {r.get("job") for r in requests}
            if len(generation) == 1 and None not in generation and len(jobs) == len(requests):
                return self._generation(requests, send)
            keys = {share_key(g) for g in graphs}
            if len(keys) != 1 or None in keys:
                raise ValueError("these graphs cannot share a forward pass")
            merged, offsets = merge(graphs)
        except Exception as e:
            logger.info("batch of %d runs job by job: %s: %s", len(requests), type(e).__name__, e)
            return [self.job(r) for r in requests]
        try:
            with torch.no_grad():
                parts = split(self.lm.run_graph(merged, limits=_limits(*requests)), graphs, offsets)
        except Exception as e:
            node = getattr(e, "node_id", None)
            if node is None:
                logger.info("batch of %d runs job by job: %s: %s", len(requests), type(e).__name__, e)
                return [self.job(r) for r in requests]
            k = bisect.bisect_right(offsets, node) - 1  # the job whose node failed
            logger.info("job %s fails the shared pass (%s): alone, the others shared again",
                        requests[k].get("job"), type(e).__name__)
            rest = self._shared(requests[:k] + requests[k + 1:])
            return [*rest[:k], self.job(requests[k]), *rest[k:]]
        answers = []
        for request, graph, values in zip(requests, graphs, parts):
            job = request.get("job")
            try:
                answers.append({"job": job, "status": "COMPLETED", "shared": len(requests),
                                "bytes": self._store(request, graph, values)})
            except Exception as e:
                answers.append(_error(job, e))
        return answers

    def _generation(self, requests: list[dict[str, Any]], send: Send | None = None) -> list[dict[str, Any]]:
        """Generate jobs in one continuous batch (server/generation.py), none joining later;
        the batch's forwards (rows, seconds, kind) go back in the first answer's "steps"."""
        answers: dict[Any, dict[str, Any]] = {}
        steps: list[Any] = []

        def collect(message: dict[str, Any]) -> dict[str, Any]:
            answers.update((a.get("job"), a) for a in message["answers"])
            steps.extend(message["steps"])
            return {}

        run_session(self, requests, collect, send)
        out = [{**answers[r.get("job")], "shared": len(requests)} for r in requests]
        out[0] = {**out[0], "steps": steps}
        return out

    def _run(self, job: Any, request: dict[str, Any], send: Send | None = None) -> int:
        graph = self._load(request)
        grad = contextlib.nullcontext() if has_backward(graph) else torch.no_grad()
        on_step = None
        if send is not None and request.get("steps"):
            on_step = step_sender(job, send, int(request.get("limits", {}).get("result_bytes") or 2**62))
        with grad:
            values = self.lm.run_graph(graph, limits=_limits(request), on_step=on_step)
        return self._store(request, graph, values)

    def _load(self, request: dict[str, Any]) -> Graph:
        graph_bytes, tensor_bytes = _graph_bytes(request)
        graph = wire.decode(graph_bytes, tensor_bytes, registry=REGISTRY, limits=self.limits)
        if graph.model != self.name:
            raise GraphError(f"this worker serves model {self.name!r}, but the graph is for "
                             f"{graph.model!r}")
        return graph

    def _store(self, request: dict[str, Any], graph: Graph, values: dict[int, Any]) -> int:
        data = encode_results(values, session=graph.mode == SESSION)
        limit = int(request.get("limits", {}).get("result_bytes") or 2**62)
        if len(data) > limit:
            raise PolicyError(f"the result is {len(data)} bytes, over this model's limit of {limit} "
                              "bytes: save less (slice before .save(), or save fewer values)")
        if isinstance(request.get("result"), str):
            try:
                _write_atomic(Path(request["result"]), data)
            except OSError as e:  # a full disk: the job's error, without the server's paths
                raise RemoteError(f"the result could not be stored: {why_not_stored(e)}") from None
        else:  # a host whose server has no shared disk: the bytes go back with the answer
            self.outbox[request.get("job")] = data
        return len(data)


def _graph_bytes(request: dict[str, Any]) -> tuple[bytes, bytes | None]:
    """A request names its graph by path (this child shares the server's disk) or carries
    it (`graph_data`, `tensor_data`: a host on another machine)."""
    if isinstance(request.get("graph_data"), bytes):
        tensors = request.get("tensor_data")
        return request["graph_data"], tensors if isinstance(tensors, bytes) else None
    tensors = request.get("tensors")
    return Path(request["graph"]).read_bytes(), Path(tensors).read_bytes() if tensors else None


def _limits(*requests: dict[str, Any]) -> RunLimits:
    """The limits a run obeys; jobs sharing one forward pass get the strictest of theirs."""
    tables = [r.get("limits") or {} for r in requests]

    def least(key: str) -> Any:
        return min((t[key] for t in tables if t.get(key) is not None), default=None)

    return RunLimits(seconds=least("run_seconds"), op_bytes=least("op_bytes"), live_bytes=least("live_bytes"),
                     hide_weights=any(bool(r.get("hide_weights")) for r in requests))


_SENDING = threading.Lock()  # the session's thread and the lane's (server/beside.py) both send


def _send(out: IO[str], message: dict[str, Any]) -> None:
    """The only writer of protocol lines (the only thing that reaches the real stdout)."""
    line = json.dumps(message, ensure_ascii=True, separators=(",", ":")) + "\n"
    with _SENDING:
        out.write(line)
        out.flush()


def _watch_parent() -> None:
    """Exit when the server is gone, even mid-job (EOF on stdin is only seen between jobs)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="nnglass-parent-watch").start()


def main() -> int:
    out = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)  # everything else that writes to fd 1 lands in stderr
    sys.stdout = sys.stderr
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    line = sys.stdin.readline()
    if not line:
        return 0
    config = json.loads(line)
    tag = f"worker[{config.get('name')}:{os.getpid()}]"
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s {tag} %(message)s")
    try:
        replica = LoadedModel(config)
    except Exception as e:
        logger.exception("could not load the model")
        _send(out, {"ready": False, "error": _error(None, e)["error"]})
        return 1
    _watch_parent()
    send = functools.partial(_send, out)
    # Jobs beside a generation run on a lane of their own, except on a rank group, whose
    # ranks must see every forward in one order (there they run between two steps).
    lane = Lane(replica, send) if not replica.rank_nodes else None
    inbox = Inbox(sys.stdin, lane)
    _send(out, {**ready_message(replica), "beside": lane is not None})
    while (request := inbox.get()) is not None:
        if isinstance(request, ValueError):
            _send(out, _error(None, request))
            continue
        if type(request.get("stream")) is list:  # a generation session (server/generation.py)
            run_session(replica, request["stream"], lambda message: _converse(inbox, send, message),
                        gated_sender(send), lane)
            continue
        _send(out, answer(replica, request, send=send))
    return 0


def _converse(inbox: Inbox, send: Send, message: dict[str, Any]) -> dict[str, Any]:
    """In a generation session: send a step message, read the parent's reply."""
    send(message)
    reply = inbox.get()
    if reply is None:
        sys.exit(0)  # the parent is gone
    return reply if type(reply) is dict else {}


def ready_message(replica: LoadedModel) -> dict[str, Any]:
    """What a host tells the server once the model is loaded."""
    paths = [p for p, _ in replica.module.named_modules()]
    found = replica.lookups if replica.lookups is not None else lookup_sites(replica.module)
    lookups = [list(site) for site in sorted(found)]
    # A rank group's forward needs every rank, so no probe runs there: its `.source` sites are refused.
    operations = operation_sites(replica.module) if replica.lookups is None else []
    return {"ready": True, "paths": paths, "operations": operations, "lookups": lookups, "pid": os.getpid(),
            **replica.debug_info()}


def answer(replica: LoadedModel, request: dict[str, Any], send: Send | None = None) -> dict[str, Any]:
    """One request's answer: a job, or a {"batch": [...]} sharing one pass. Every host of a
    replica (this child's stdin loop, a Ray actor) answers through this one function;
    `send`, where the host has one, carries a generating job's step lines meanwhile."""
    batch = request.get("batch")
    crash_or_hang(batch if type(batch) is list else [request])
    if type(batch) is list:
        return replica.batch(batch, gated_sender(send))
    return replica.job(request, gated_sender(send))


if __name__ == "__main__":
    sys.exit(main())
