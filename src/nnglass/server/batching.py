"""How jobs are batched: what a job costs in tokens, how it may share a pass, and what
the passes were (for `/v1/models` and `/metrics`).

Invariants:
- A job's cost is counted in padded tokens (rows x its padded width), plus its new
  tokens in generation: the unit the scheduler is fair in and a pass is budgeted in.
- Statistics are what this process saw (no estimates): per pass, the jobs in it, its
  padded tokens, the time it took; per job, how long it waited in the queue; per forward
  of a shared generation, its rows and seconds (what the worker measured), the joiners'
  prompt forwards (prefills) also on their own.
"""

from __future__ import annotations

import threading
from typing import Any

from ..graph.ir import GENERATE, GENERATE_KWARGS, Graph, TensorRef
from ..graph.merge import share_key, width
from ..models.batched_generate import GENERATION as GENERATION
from ..models.batched_generate import generation_key
from .scheduler import Share

# Prometheus buckets: jobs in a pass, padded tokens in a pass, seconds (queue wait, pass).
JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)
SECOND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def rows_of(graph: Graph) -> int:
    rows = 0
    for g in graph.children or [graph]:
        for inv in g.invokes:
            ids = inv.kwargs.get("input_ids")
            if type(ids) is TensorRef and ids.key in g.tensors:
                rows += int(g.tensors[ids.key].shape[0])
    return rows


def cost_of(graph: Graph) -> int:
    """Padded prompt tokens (each trace's rows x its width), plus new tokens when generating."""
    total = 0
    for g in graph.children or [graph]:
        rows, new = rows_of(g), 0
        if g.mode == GENERATE:
            new = int(g.options.get(GENERATE_KWARGS, {}).get("max_new_tokens", 1) or 1)
        total += rows * (max(width(g), 0) + new)
    return max(total, 1)


def share_of(graph: Graph) -> Share | None:
    """Traces share a forward pass (graph.merge.share_key); plain generate jobs share a
    continuous batch (models/batched_generate.generation_key)."""
    key = share_key(graph) or generation_key(graph)
    return None if key is None else Share(key, rows_of(graph), max(width(graph), 1))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.total, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.total:g}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out

    def mean(self) -> float | None:
        return round(self.total / self.n, 4) if self.n else None


class PassStats:
    """One model's passes: jobs per pass, padded tokens per pass, seconds per pass, and
    each job's queue wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs = Histogram(JOB_BUCKETS)
        self.tokens = Histogram(TOKEN_BUCKETS)
        self.seconds = Histogram(SECOND_BUCKETS)
        self.waits = Histogram(SECOND_BUCKETS)
        self.step_rows = Histogram(JOB_BUCKETS)  # rows in one forward of a shared generation
        self.step_seconds = Histogram(SECOND_BUCKETS)
        self.prefill_rows = Histogram(JOB_BUCKETS)  # rows of the joiners' prompt forwards, of those
        self.prefill_seconds = Histogram(SECOND_BUCKETS)

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.waits.observe(max(seconds, 0.0))

    def ran(self, jobs: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.jobs.observe(jobs)
            self.tokens.observe(tokens)
            self.seconds.observe(seconds)

    def stepped(self, steps: list[Any]) -> None:
        """A shared generation's forwards, as the worker sent them: [[rows, seconds, kind],
        ...] (kind "prefill": joiners' prompts; "decode")."""
        with self._lock:
            for rows, seconds, *kind in steps[:100_000]:
                self.step_rows.observe(int(rows))
                self.step_seconds.observe(float(seconds))
                if kind == ["prefill"]:
                    self.prefill_rows.observe(int(rows))
                    self.prefill_seconds.observe(float(seconds))

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"passes": self.jobs.n, "mean_jobs_per_pass": self.jobs.mean(),
                    "mean_tokens_per_pass": self.tokens.mean(), "mean_pass_s": self.seconds.mean(),
                    "mean_queue_wait_s": self.waits.mean(), "generation_steps": self.step_rows.n,
                    "mean_rows_per_step": self.step_rows.mean(), "mean_step_s": self.step_seconds.mean(),
                    "generation_prefills": self.prefill_rows.n,
                    "mean_rows_per_prefill": self.prefill_rows.mean(),
                    "mean_prefill_s": self.prefill_seconds.mean()}

    def lines(self, model: str) -> list[str]:
        labels = f'model="{model}"'
        with self._lock:
            return [*self.jobs.lines("nnglass_pass_jobs", labels),
                    *self.tokens.lines("nnglass_pass_tokens", labels),
                    *self.seconds.lines("nnglass_pass_seconds", labels),
                    *self.waits.lines("nnglass_queue_wait_seconds", labels),
                    *self.step_rows.lines("nnglass_generation_step_rows", labels),
                    *self.step_seconds.lines("nnglass_generation_step_seconds", labels),
                    *self.prefill_rows.lines("nnglass_generation_prefill_rows", labels),
                    *self.prefill_seconds.lines("nnglass_generation_prefill_seconds", labels)]


def prompt_tokens(graph: Graph) -> int:
    """The real (unpadded) prompt tokens of a graph's traces: its attention masks' sum."""
    total = 0
    for g in graph.children or [graph]:
        for inv in g.invokes:
            mask = inv.kwargs.get("attention_mask")
            if type(mask) is TensorRef and mask.key in g.tensors:
                total += int(g.tensors[mask.key].sum())
    return total
