"""Submissions this process is taking in and has not yet queued (or refused): what a pass
that is about to start may wait for, so that jobs sent together run together.

Thirty-two clients that submit at once reach the queue over a few hundred milliseconds
(each request is authenticated, read, decoded, validated, stored and queued, interleaved
with the others); the first of them used to start a pass nearly alone while the rest
queued behind it for a second pass. `settle` lets a pass wait for the submissions in hand
when it was due.

Invariants:
- A submission is open from the moment its request passes the key check (`app.Guard`: an
  anonymous caller holds nothing back) until it is queued or refused, whatever the outcome;
  `open()`'s closer may be called any number of times. `Service.submit` calls it the
  moment the queue has the job (its `queued`), before the rest of the submission (the
  event, the status answered): a lone job's pass never waits for its own tail. A pass
  waits only when the queued jobs leave it room (replica._room).
- `settle` waits while submissions are open (those open when it is called, and any that
  open meanwhile: clients that send at once reach the server over tens of milliseconds),
  at most its timeout in all, so a steady stream of arrivals delays a pass by at most the
  timeout. A submission open for longer than the timeout (a client that uploads slowly)
  is not waited for at all: no client holds passes back by more than one timeout, once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Arrivals:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open: dict[int, float] = {}  # ticket -> when the submission opened (monotonic)
        self._tickets = itertools.count()

    def open(self) -> Callable[[], None]:
        """A submission arrives; call what this returns once it is queued or refused."""
        with self._changed:
            ticket = next(self._tickets)
            self._open[ticket] = time.monotonic()

        def close() -> None:
            with self._changed:
                if self._open.pop(ticket, None) is not None:
                    self._changed.notify_all()

        return close

    @property
    def pending(self) -> int:
        """Submissions open now."""
        with self._changed:
            return len(self._open)

    def settle(self, timeout: float) -> int:
        """Wait while submissions are open (each opened less than `timeout` ago), at most
        `timeout` seconds in all: until none is; how many it waited for."""
        with self._changed:
            deadline, seen = time.monotonic() + timeout, set()
            while True:
                now = time.monotonic()
                waiting = {t for t, opened in self._open.items() if now - opened < timeout}
                seen |= waiting
                if not waiting or now >= deadline:
                    return len(seen)
                self._changed.wait(deadline - now)


def closing(close: Callable[[], None], call: Callable[..., T]) -> Callable[..., T]:
    """`call`, then `close` in the same thread as it returns or raises: the pass its queueing
    wakes finds the submission closed, instead of waiting for the event loop to close it."""

    def run(*args: Any) -> T:
        try:
            return call(*args)
        finally:
            close()

    return run
