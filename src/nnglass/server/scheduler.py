"""The scheduler: one queue per model, fair across API keys, counted in tokens.

Invariants:
- Within a model, the next job is the oldest of the key that has been served the fewest
  tokens (a job's cost: its padded prompt tokens, and its new tokens in generation; 1
  when unknown), ties going to the key served longest ago. Equal jobs take turns round
  robin; a key with 100 long jobs queued delays another key's single job by at most
  the pass that runs now. A key that starts queueing again starts where the job taken
  last started (start-time fair queueing: no credit is banked while idle, and a
  newcomer goes before the key just served). Within a key, jobs run in submission order.
- Positions are what a job's owner sees: how many jobs will start before it, by the
  same rule. The scheduler holds ids only; the job store holds the truth.
- `next(..., skip=prefix)`: the keys whose next job's share key starts with `prefix`
  wait this turn (a full generation batch takes no generate job, but a trace still runs
  between two of its steps); the others are served by the same rule.
- `take_sharing` takes the jobs that can share a forward pass with the one just taken,
  in start order, within a job count and a padded-token budget, waiting for more while
  they keep arriving (a short gap ends the wait, and the wait is bounded).

`Queue` is the seam: `Scheduler` (in this process's memory) is the embedded default;
`pg_queue.PgQueue` keeps a queue in PostgreSQL, shared by several frontends (fair in
tokens by the same rule). The service never asks which one it has. `hold(key_id)` makes
a key's quota check and its queueing one step (here a lock; there an advisory lock
every frontend sees). `orphans(unfinished)` answers the
unfinished jobs no live process holds: for a process-local queue, every unfinished job
the first time (the process that held them is gone), none after.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .jobs import Job

WAIT_ROUNDS = 20  # a pass waits for more jobs at most this many wait windows in all


@dataclass(frozen=True)
class Share:
    """How a job may share a pass: its co-tenancy key (graph.merge.share_key), its rows
    and its padded width (a merged pass costs all rows times the widest width)."""

    key: str
    rows: int
    width: int


class Queue(Protocol):
    def submit(self, model: str, key_id: str, job_id: str, share: Share | None = None,
               cost: int = 1) -> None: ...
    def take_sharing(self, model: str, job_id: str, limit: int, tokens: int | None = None,
                     wait: float = 0.0) -> list[str]: ...
    def next(self, model: str, timeout: float | None = None, skip: str | None = None) -> str | None: ...
    def cancel(self, model: str, job_id: str) -> bool: ...
    def release(self, job: Job) -> None: ...
    def positions(self, model: str) -> dict[str, int]: ...
    def depth(self, model: str) -> int: ...
    def queued_by(self, key_id: str) -> int: ...
    def hold(self, key_id: str) -> AbstractContextManager[None]: ...
    def orphans(self, unfinished: Callable[[], list[Job]]) -> list[Job]: ...
    def tick(self) -> None: ...
    def close(self) -> None: ...


class ModelQueue:
    """Jobs waiting for one model, grouped by key, the least-served key first."""

    def __init__(self) -> None:
        self.by_key: OrderedDict[str, deque[str]] = OrderedDict()
        self.served: dict[str, int] = {}  # tokens served per key (active keys, and idle ones until all idle)
        self.cost: dict[str, int] = {}  # job id -> tokens it costs
        self.clock = 0  # what the key of the job taken last had been served before it

    def push(self, key_id: str, job_id: str, cost: int = 1) -> None:
        if not self.by_key:
            self.served.clear()  # nobody waits: everyone starts level
            self.clock = 0
        elif key_id not in self.by_key:
            self.served[key_id] = max(self.served.get(key_id, 0), self.clock)
        self.by_key.setdefault(key_id, deque()).append(job_id)
        self.cost[job_id] = max(int(cost), 1)

    def _next_key(self, wanted: Callable[[str], bool] | None = None) -> str | None:
        keys = [k for k, jobs in self.by_key.items() if wanted is None or wanted(jobs[0])]
        # The first of equals: the key served longest ago.
        return min(keys, key=lambda k: self.served.get(k, 0)) if keys else None

    def pop(self, wanted: Callable[[str], bool] | None = None) -> str | None:
        """The next job; `wanted`: only among the keys whose next job it accepts."""
        key = self._next_key(wanted)
        if key is None:
            return None
        job_id = self.by_key[key][0]
        self.remove(job_id, served=True)
        return job_id

    def remove(self, job_id: str, served: bool = False) -> bool:
        """Drop a queued job; `served`: it runs now, so its key is charged its tokens and
        goes behind the keys it is level with."""
        for key_id, jobs in self.by_key.items():
            if job_id in jobs:
                jobs.remove(job_id)
                cost = self.cost.pop(job_id, 1)
                if served:
                    self.clock = self.served.get(key_id, 0)
                    self.served[key_id] = self.clock + cost
                if not jobs:
                    del self.by_key[key_id]
                elif served:
                    self.by_key.move_to_end(key_id)
                return True
        return False

    def order(self) -> list[str]:
        """Every queued job in the order it will start (`pop` over a copy, by a heap)."""
        heap = [(self.served.get(k, 0), rank, k) for rank, k in enumerate(self.by_key)]
        heapq.heapify(heap)
        lanes = {k: deque(jobs) for k, jobs in self.by_key.items()}
        rank = len(heap)
        out: list[str] = []
        while heap:
            served, _, k = heapq.heappop(heap)
            job_id = lanes[k].popleft()
            out.append(job_id)
            if lanes[k]:
                heapq.heappush(heap, (served + self.cost.get(job_id, 1), rank, k))
                rank += 1
        return out

    def count(self, key_id: str) -> int:
        return len(self.by_key.get(key_id, ()))

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self.by_key.values())


class Scheduler:
    """Per-model fair queues; workers block in `next` until there is work."""

    def __init__(self, models: list[str]) -> None:
        self._queues = {name: ModelQueue() for name in models}
        self._share: dict[str, Share] = {}  # job id -> how it may share a pass
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

    def submit(self, model: str, key_id: str, job_id: str, share: Share | None = None, cost: int = 1) -> None:
        with self._ready:
            self._queues[model].push(key_id, job_id, cost)
            if share is not None:
                self._share[job_id] = share
            self._ready.notify_all()

    def take_sharing(self, model: str, job_id: str, limit: int, tokens: int | None = None,
                     wait: float = 0.0) -> list[str]:
        """Queued jobs that can share `job_id`'s forward pass (same share key), taken in
        the order they would have started (they only start earlier): at most `limit`,
        and while the pass stays within `tokens` padded tokens (rows x widest width; a
        job that does not fit is left for a later pass). While the pass is not full it
        waits for more: until none has arrived for `wait` seconds (jobs sent at once
        arrive one by one), at most `WAIT_ROUNDS` times that in all."""
        with self._ready:
            first = self._share.pop(job_id, None)
            if first is None or limit <= 0:
                return []
            queue = self._queues[model]
            taken: list[str] = []
            rows, width = first.rows, first.width
            now = time.monotonic()
            deadline, last_call = now + wait, now + wait * WAIT_ROUNDS
            while True:
                full = False
                for j in queue.order():
                    share = self._share.get(j)
                    if share is None or share.key != first.key:
                        continue
                    w, r = max(width, share.width), rows + share.rows
                    if tokens is not None and r * w > tokens:
                        full = True
                        continue
                    queue.remove(j, served=True)
                    del self._share[j]
                    taken.append(j)
                    rows, width = r, w
                    deadline = min(time.monotonic() + wait, last_call)  # one arrived: wait again
                    if len(taken) >= limit:
                        return taken
                left = deadline - time.monotonic()
                if full or left <= 0 or self._closed or not self._ready.wait(left):
                    return taken

    def next(self, model: str, timeout: float | None = None, skip: str | None = None) -> str | None:
        """The next job for `model`, waiting up to `timeout`; None when closed or timed out.
        `skip`: keys whose next job's share key starts with it wait (module docstring)."""

        def wanted(job_id: str) -> bool:
            share = self._share.get(job_id)
            return share is None or not share.key.startswith(skip or "")

        check = None if skip is None else wanted
        with self._ready:
            queue = self._queues[model]
            if not self._ready.wait_for(lambda: self._closed or queue._next_key(check) is not None, timeout):
                return None
            if self._closed:
                return None
            return queue.pop(check)

    def release(self, job: Job) -> None:
        """A job taken by `next` that could not run: queued again (at its key's back)."""
        self.submit(job.model, job.key_id, job.id)

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
