"""What the service knows of one configured model: its replicas' workers, the jobs they
run, and what it reports of them (`/v1/models`, the dashboard, `/metrics`).

Invariants:
- Everything reported is what this process saw (no estimates): a frontend that runs no
  replica of a model reports none of its activity.
- `ended` holds the last minute's finished jobs only; it is trimmed under its own lock,
  so a report never races a replica thread recording an end.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import clock
from .batching import PassStats
from .config import ModelConfig
from .exposure import describe

if TYPE_CHECKING:  # a Worker is a replica's protocol (server/replica.py)
    from .engines import Worker


@dataclass
class ModelState:
    config: ModelConfig
    paths: set[str] = field(default_factory=set)
    lookups: frozenset[tuple[str, str]] | None = None  # sites that are lookups of weights (None: unknown)
    state: str = "loading"  # loading | ready | failed
    error: str = ""
    running: dict[str, Worker] = field(default_factory=dict)  # job id -> the worker running it
    sharing: set[str] = field(default_factory=set)  # running jobs in a pass with others
    dropping: set[str] = field(default_factory=set)  # cancelled in a generation session: leaves at a step
    checksums: set[str] = field(default_factory=set)  # debug: weights after each job and at start
    grad_seen: bool = False  # debug: a parameter had a .grad after a job (must never happen)
    workers: list[Worker] = field(default_factory=list)  # one per replica
    last_pass: int = 0  # jobs in the last request a replica ran (1: alone, more: one shared pass)
    ended: deque[tuple[float, int]] = field(default_factory=deque)  # (when, prompt tokens): last minute
    passes: PassStats = field(default_factory=PassStats)  # jobs and tokens per pass, times, queue waits
    _ended_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ended_one(self, prompt_tokens: int) -> None:
        with self._ended_lock:
            self.ended.append((clock.now(), prompt_tokens))

    def info(self, queue_depth: int, debug_checksums: bool) -> dict[str, Any]:
        """This model's entry in `/v1/models`."""
        c = self.config
        out = {"name": c.name, "state": self.state, "error": self.error or None, "source": c.source,
               "replicas": c.replicas, "queue_depth": queue_depth, "running": len(self.running),
               "policy": c.policy.summary(), "exposure": describe(c.policy, self.lookups),
               **self.activity()}
        if debug_checksums:  # one checksum seen across all jobs: weights never changed
            out["weight_checksums"] = sorted(self.checksums)
            out["grad_seen"] = self.grad_seen
        return out

    def activity(self) -> dict[str, Any]:
        """What the replicas do."""
        with self._ended_lock:
            while self.ended and self.ended[0][0] < clock.now() - 60:
                self.ended.popleft()
            ended, tokens = len(self.ended), sum(n for _, n in self.ended)
        c = self.config
        return {
            "replicas_alive": sum(w.alive for w in self.workers),
            "replicas_busy": len({id(w) for w in list(self.running.values())}),
            "last_pass_jobs": self.last_pass,
            "jobs_last_minute": ended,
            "prompt_tokens_per_s": round(tokens / 60, 2),  # of the jobs that ended in the last minute
            "batching": {"share_jobs": c.share_jobs, "share_tokens": c.share_tokens,
                         "share_wait_s": c.share_wait_s, "share_settle_s": c.share_settle_s,
                         "join_wait_s": c.join_wait_s, "join_tokens": c.join_tokens, **self.passes.summary()},
        }

    def metric_lines(self, queue_depth: int) -> list[str]:
        name = self.config.name
        return [f'nnglass_queue_depth{{model="{name}"}} {queue_depth}',
                f'nnglass_running_jobs{{model="{name}"}} {len(self.running)}',
                f'nnglass_model_ready{{model="{name}"}} {int(self.state == "ready")}',
                *self.passes.lines(name)]

    def paths_from_config(self) -> set[str]:
        """Module paths before a worker is ready: the model's tree on the meta device."""
        from ..models import loading

        source = loading.resolve_model_source(self.config.source)
        config, _ = loading.load_config_and_tokenizer(source)
        self.paths = {p for p, _ in loading.meta_model(config).named_modules()}
        return self.paths
