"""Pushing job changes to listeners (the SSE streams) across threads and event loops.

Workers run in threads; stream handlers are coroutines. `publish(job_id)` may be called
from any thread and wakes every coroutine waiting on that job, and every listener to all
changes (`listen_all`, which also learns which jobs changed). A waiter that times out
just re-reads: nothing is lost, a change is at worst seen on the next wake. The hub
carries job ids only, never who owns them: a listener checks ownership when it reads.
`deliver` is the local half of `publish`; a hub that spans processes (pg_events.PgHub)
publishes elsewhere and delivers what comes back. Observers (`observe`) learn of every
delivered change, in the delivering thread, except a hub's own changes delivered at their
commit (`deliver(job_id, observed=False)`): its process made them and acted on them already.
`wake` reaches only the waiters of one job
that listen for its steps too (`listen(job_id, steps=True)`), in this process: a new
generation step (server/steps.py) is not a change of the job, and costs nobody else a read.
Such a listener also wants the job's steps from wherever it runs (`relay`, step_relay.py:
nothing in one process; the other frontends' lines for a hub across processes).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from .step_relay import NO_RELAY


class EventHub:
    """`with hub.listen(job_id) as changed:` then, in a loop, `changed.clear()`, read the
    job, and `await wait(changed, timeout)`: clearing before reading means a change that
    lands between the read and the wait is never missed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]]] = {}
        self._all: set[Changes] = set()
        self._observers: list[Callable[[str], None]] = []
        self.relay: Any = NO_RELAY  # the steps of jobs run by another frontend

    def observe(self, observer: Callable[[str], None]) -> None:
        self._observers.append(observer)

    def publish(self, job_id: str) -> None:
        self.deliver(job_id)

    def publish_many(self, job_ids: list[str]) -> None:
        """`publish` each (a hub across processes sends them in one round trip)."""
        for job_id in job_ids:
            self.publish(job_id)

    def deliver(self, job_id: str, observed: bool = True) -> None:
        for observer in self._observers if observed else ():
            observer(job_id)
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
            every = list(self._all)
        for loop, event, _ in waiters:
            loop.call_soon_threadsafe(event.set)
        for changes in every:
            changes.add(job_id)

    def wake(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event, steps in waiters:
            if steps:
                loop.call_soon_threadsafe(event.set)

    @contextmanager
    def listen_all(self) -> Iterator[Changes]:
        """Every job's changes while the block runs: in a loop, `changes.take()` (the ids
        changed since the last take), read them, then `await wait(changes.event, timeout)`."""
        changes = Changes(asyncio.get_running_loop())
        with self._lock:
            self._all.add(changes)
        try:
            yield changes
        finally:
            with self._lock:
                self._all.discard(changes)

    @contextmanager
    def listen(self, job_id: str, steps: bool = False) -> Iterator[asyncio.Event]:
        """An event set on every change of `job_id` while the block runs (and, with
        `steps`, on each of its generation steps)."""
        entry = (asyncio.get_running_loop(), asyncio.Event(), steps)
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            with ExitStack() as wanting:
                if steps:
                    wanting.enter_context(self.relay.want(job_id))
                yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]


class Changes:
    """The ids of jobs changed since the last `take`, and an event set when one is added.
    Taking clears the event under the same lock as adding sets it (the set itself runs
    later, on the loop), so an id added after a take always wakes the next wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self._loop = loop
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids.add(job_id)
            self._loop.call_soon_threadsafe(self.event.set)

    def take(self) -> set[str]:
        with self._lock:
            ids, self._ids = self._ids, set()
            self.event.clear()
        return ids


async def wait(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set, or `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        pass
