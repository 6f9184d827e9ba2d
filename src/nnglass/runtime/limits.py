"""What configures one run (`RunConfig`), and its limits: wall time, the bytes one op may
make, the bytes a run may hold.

A server passes them with each job (`model.run_graph(graph, limits=RunLimits(...))`, which
hands them to the interpreter in its `RunConfig`); a local run has none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .shards import SiteLayouts


@dataclass(frozen=True)
class RunLimits:
    seconds: float | None = None  # wall time of the run (checked between nodes and in hooks)
    op_bytes: int | None = None  # the most bytes one op may make (checked before it runs)
    live_bytes: int | None = None  # the most bytes the values of one run may hold at once
    hide_weights: bool = False  # the model's weights are hidden: `.inputs` shows only `.input`

    def deadline(self) -> float | None:
        return None if self.seconds is None else time.monotonic() + self.seconds

    def bounds_run(self) -> bool:
        """Whether a run must be checked as it goes (`runtime.limited.LimitedInterpreter`)."""
        return self.seconds is not None or self.op_bytes is not None or self.live_bytes is not None


NO_LIMITS = RunLimits()


@dataclass(frozen=True)
class RunConfig:
    """What configures one run. `can_stop`: the forward may stop once nothing more is
    needed (not in generation); `copy_saves`: saves are copies from the start (a model
    known to edit its outputs in place); `sites`: a tensor-parallel model's shard layouts
    (runtime/shards.py): the graph sees whole tensors where the model holds shards."""

    limits: RunLimits = NO_LIMITS
    can_stop: bool = True
    copy_saves: bool = False
    sites: SiteLayouts | None = None


PLAIN_RUN = RunConfig()  # a local run: no limits
