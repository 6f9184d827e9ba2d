"""Limits on one run: wall time, the bytes one op may make, the bytes a run may hold.

A server sets them around each job (`with run_limits(RunLimits(...))`); a local run has
none. The interpreter reads the active limits once, when a run starts.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


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
_ACTIVE: contextvars.ContextVar[RunLimits] = contextvars.ContextVar("nnglass_limits", default=NO_LIMITS)


@contextmanager
def run_limits(limits: RunLimits) -> Iterator[None]:
    """Runs started inside this block obey `limits`."""
    token = _ACTIVE.set(limits)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_limits() -> RunLimits:
    return _ACTIVE.get()
