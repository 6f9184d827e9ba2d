"""The per-step hook of generation: after each step's token is chosen, a generation loop
tells a `StepListener` which tokens it made and which saved values that step added.

This is the one interface between a generation loop and whoever streams its output
(server/steps.py sends it to the server, which turns it into SSE). `LanguageModel`'s
loop (transformers' `generate`) calls it through `StepStreamer`; a loop that runs
several jobs at once (continuous batching) calls each job's own listener, per step,
with that job's rows and that job's node ids, exactly as if it ran alone.

    listener(step, tokens, saved)
      step:   0 for the token the prompt's pass produced, k for the k-th after it
      tokens: int64 [rows, 1] on the CPU, one new token per row of the job (a finished
              row repeats the pad token, as in the result)
      saved:  node id -> what that node saved during this step: for a node inside
              `tracer.all()`, the list of its new entries (one per call of the site,
              usually one); for a node of `tracer.step(k)`, its value. Values are the
              interpreter's own snapshots: a listener must not change them.

Invariants:
- Called in the loop's thread, after the step's forward pass (every node of that step
  has run) and before the next one: a slow listener slows generation, nothing else.
  Concatenating the steps' tokens gives the result's generated columns; appending the
  steps' entries gives each saved list of the final values.
- A listener that raises ends the run with that error (it is the caller's code).
- No listener, no cost: the loop runs as without this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..graph.ir import ALL_STEPS

if TYPE_CHECKING:
    from .interpreter import Interpreter

StepListener = Callable[[int, torch.Tensor, dict[int, Any]], None]


class StepStreamer:
    """transformers' streamer protocol (`put`, `end`) as a StepListener's caller: the first
    `put` is the prompt (skipped), each later one a step's new tokens."""

    def __init__(self, interp: Interpreter, listener: StepListener) -> None:
        self.interp = interp
        self.listener = listener
        self.step = -1  # -1: the prompt has not been put yet
        nodes = interp.nodes
        self._every = [n.id for n in nodes if n.save and n.step == ALL_STEPS]
        self._at: dict[int, list[int]] = {}  # step -> its saved nodes
        for n in nodes:
            if n.save and n.step != ALL_STEPS:
                self._at.setdefault(n.step, []).append(n.id)
        self._seen = dict.fromkeys(self._every, 0)  # node -> entries already reported

    def put(self, value: torch.Tensor) -> None:
        self.step += 1
        if self.step == 0:
            return  # the prompt
        step = self.step - 1
        saved_all = self.interp.saved
        saved: dict[int, Any] = {}
        for i in self._every:
            entries = saved_all.get(i)
            if entries is not None and len(entries) > self._seen[i]:
                saved[i] = entries[self._seen[i]:]
                self._seen[i] = len(entries)
        for i in self._at.get(step, ()):
            if i in saved_all:
                saved[i] = saved_all[i]
        self.listener(step, value.reshape(value.shape[0], -1).to("cpu", torch.int64), saved)

    def end(self) -> None:
        pass
