"""The scheduler: one queue per model, fair across API keys.

Invariant: within a model, keys take turns (round robin over the keys that have
queued jobs), so one heavy user cannot starve the others; within a key, jobs run in
submission order. Positions are what a job's owner sees: how many jobs will start
before it. The scheduler holds ids only; the job store holds the truth.

`Queue` is the seam: `Scheduler` (in this process's memory) is the embedded default;
`pg_queue.PgQueue` keeps the same queue in PostgreSQL, shared by several frontends.
The service never asks which one it has. `hold(key_id)` makes a key's quota check and
its queueing one step (here a lock; there an advisory lock every frontend sees).
`orphans(unfinished)` answers the unfinished jobs no live process holds: for a
process-local queue, every unfinished job the first time (the process that held them
is gone), none after.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .jobs import Job


class Queue(Protocol):
    def submit(self, model: str, key_id: str, job_id: str, share: str | None = None) -> None: ...
    def take_sharing(self, model: str, job_id: str, limit: int) -> list[str]: ...
    def next(self, model: str, timeout: float | None = None) -> str | None: ...
    def cancel(self, model: str, job_id: str) -> bool: ...
    def positions(self, model: str) -> dict[str, int]: ...
    def depth(self, model: str) -> int: ...
    def queued_by(self, key_id: str) -> int: ...
    def hold(self, key_id: str) -> AbstractContextManager[None]: ...
    def orphans(self, unfinished: Callable[[], list[Job]]) -> list[Job]: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


class ModelQueue:
    """Jobs waiting for one model, grouped by key, served round robin."""

    def __init__(self) -> None:
        self.by_key: OrderedDict[str, deque[str]] = OrderedDict()

    def push(self, key_id: str, job_id: str) -> None:
        self.by_key.setdefault(key_id, deque()).append(job_id)

    def pop(self) -> str | None:
        if not self.by_key:
            return None
        key_id, jobs = next(iter(self.by_key.items()))
        job_id = jobs.popleft()
        del self.by_key[key_id]
        if jobs:
            self.by_key[key_id] = jobs  # this key goes to the back of the line
        return job_id

    def remove(self, job_id: str, served: bool = False) -> bool:
        """Drop a queued job; `served`: it runs now, so its key goes to the back of the line."""
        for key_id, jobs in self.by_key.items():
            if job_id in jobs:
                jobs.remove(job_id)
                if not jobs:
                    del self.by_key[key_id]
                elif served:
                    self.by_key.move_to_end(key_id)
                return True
        return False

    def order(self) -> list[str]:
        """Every queued job in the order it will start."""
        lanes = [list(jobs) for jobs in self.by_key.values()]
        out: list[str] = []
        depth = max((len(lane) for lane in lanes), default=0)
        for i in range(depth):
            out.extend(lane[i] for lane in lanes if i < len(lane))
        return out

    def count(self, key_id: str) -> int:
        return len(self.by_key.get(key_id, ()))

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self.by_key.values())


class Scheduler:
    """Per-model fair queues; workers block in `next` until there is work."""

    def __init__(self, models: list[str]) -> None:
        self._queues = {name: ModelQueue() for name in models}
        self._share: dict[str, str] = {}  # job id -> co-tenancy key (graph.merge.share_key)
        self._ready = threading.Condition()
        self._closed = False
        self._key_locks: dict[str, threading.Lock] = {}
        self._recovered = False

    @contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        with self._ready:
            lock = self._key_locks.setdefault(key_id, threading.Lock())
        with lock:
            yield

    def orphans(self, unfinished: Callable[[], list[Job]]) -> list[Job]:
        if self._recovered:
            return []
        jobs = unfinished()  # raises (and stays unrecovered) while the database is locked
        self._recovered = True
        return jobs

    def tick(self) -> None:
        pass  # nothing is shared: no lease to renew

    def submit(self, model: str, key_id: str, job_id: str, share: str | None = None) -> None:
        with self._ready:
            self._queues[model].push(key_id, job_id)
            if share is not None:
                self._share[job_id] = share
            self._ready.notify_all()

    def take_sharing(self, model: str, job_id: str, limit: int) -> list[str]:
        """Queued jobs that can share `job_id`'s forward pass (same share key), up to
        `limit`, taken in the order they would have started: they only start earlier."""
        with self._ready:
            share = self._share.pop(job_id, None)
            if share is None or limit <= 0:
                return []
            queue = self._queues[model]
            taken = [j for j in queue.order() if self._share.get(j) == share][:limit]
            for j in taken:
                queue.remove(j, served=True)
                del self._share[j]
            return taken

    def next(self, model: str, timeout: float | None = None) -> str | None:
        """The next job for `model`, waiting up to `timeout`; None when closed or timed out."""
        with self._ready:
            queue = self._queues[model]
            if not self._ready.wait_for(lambda: self._closed or len(queue) > 0, timeout):
                return None
            if self._closed:
                return None
            return queue.pop()

    def cancel(self, model: str, job_id: str) -> bool:
        with self._ready:
            self._share.pop(job_id, None)
            return self._queues[model].remove(job_id)

    def positions(self, model: str) -> dict[str, int]:
        """Queued job id → how many jobs start before it (0: next)."""
        with self._ready:
            return {job_id: i for i, job_id in enumerate(self._queues[model].order())}

    def depth(self, model: str) -> int:
        with self._ready:
            return len(self._queues[model])

    def queued_by(self, key_id: str) -> int:
        with self._ready:
            return sum(q.count(key_id) for q in self._queues.values())

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
