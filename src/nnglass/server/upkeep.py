"""The service's background upkeep, each loop in a thread of its own (`Service.start`).

- `recover`: jobs no live process holds (a previous run left them, or a frontend that
  died) run again, or fail with a reason: at start, then every `TICK_S`.
- `lease_loop`: this frontend's lease on the jobs it runs, renewed every `TICK_S` in its
  own thread, so slow upkeep never lets it lapse (then other frontends would take them).
- `upkeep_loop`: recovery, expired results (every quarter of the result TTL, at most a
  minute), and the files of half-written jobs a killed server left (server/leftovers.py).

Invariant: a locked or unreachable database never ends a loop; the next round does the
work, and nothing is lost meanwhile (a job's row is only ever moved on, never dropped).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..errors import UnavailableError
from . import clock
from .jobs import JobStatus
from .leftovers import PARTIAL_AGE_S, sweep_partial

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)
TICK_S = 2.0  # how often the queue's lease is renewed and orphaned jobs are looked for


def recover(service: Service) -> None:
    for job in service.durably(service.scheduler.orphans, service.jobs.unfinished):
        if job.model not in service.models or not service.results.has_graph(job.id):
            service.finish(job.id, JobStatus.ERROR, error={
                "type": "RemoteError", "where": "",
                "message": "the server restarted and this job's model or graph is gone"})
        elif job.status == JobStatus.RUNNING and job.attempts >= 2:
            service.finish(job.id, JobStatus.ERROR, error={
                "type": "RemoteError", "where": "",
                "message": "this job was started twice and the server or its worker stopped "
                           "both times before it finished"})
        else:
            service.durably(service.jobs.update, job.id, status=JobStatus.QUEUED.value,
                            queued_at=clock.now())
            service.scheduler.submit(job.model, job.key_id, job.id)


def lease_loop(service: Service) -> None:
    while not service.wait(TICK_S):
        try:
            service.scheduler.tick()
        except UnavailableError as e:
            log.warning("cannot renew this frontend's lease: %s", e.message)


def upkeep_loop(service: Service) -> None:
    every, last = min(60.0, max(1.0, service.config.result_ttl_s / 4)), time.monotonic()
    swept = -PARTIAL_AGE_S
    while not service.wait(TICK_S):
        try:
            if time.monotonic() - swept >= PARTIAL_AGE_S:
                sweep_partial(service.results, service.jobs)
                swept = time.monotonic()
            recover(service)
            if time.monotonic() - last >= every:
                last = time.monotonic()
                service.expire(clock.now())
        except UnavailableError as e:
            log.info("upkeep later: %s", e.message)
