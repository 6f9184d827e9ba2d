"""Pushing job changes to listeners (the SSE stream) across threads and event loops.

Workers run in threads; stream handlers are coroutines. `publish(job_id)` may be called
from any thread and wakes every coroutine waiting on that job. A waiter that times out
just re-reads the job: nothing is lost, a change is at worst seen on the next wake.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class EventHub:
    """`with hub.listen(job_id) as changed:` then, in a loop, `changed.clear()`, read the
    job, and `await wait(changed, timeout)`: clearing before reading means a change that
    lands between the read and the wait is never missed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def publish(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    @contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set on every change of `job_id` while the block runs."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]


async def wait(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set, or `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
