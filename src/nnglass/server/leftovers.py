"""Half-written jobs a killed server left in the result store, found and removed.

A submission stores its graph first and then its row (service.py: a row always has its
graph). A server killed between the two (`kill -9` mid-upload, a machine losing power)
leaves a job folder, or an S3 object, that no row names: nobody can reach it, and
nothing else would ever remove it.

Invariant: files are removed here only for a job the job store has no row for, and only
once all of them are older than `PARTIAL_AGE_S`: a younger folder may be a submission
still in flight (in this process or, with shared storage, in another frontend) whose row
is being written. The age is read on the storage's own clock (file or object times)
against `time.time()`, never against the service's held clock (server/clock.py): after
a clock step back that one runs ahead of the file times, and a fresh folder would look
old. The job store is asked before anything goes; a store that cannot answer
(UnavailableError) stops the sweep, it is never taken for "no row".
"""

from __future__ import annotations

import logging
import time

from .jobs import JobStore
from .results import ResultStore

log = logging.getLogger(__name__)

# Far above the time from a submission's graph to its row (a locked SQLite waits 2 s,
# the PostgreSQL pool gives up in seconds): only a dead submission's files get this old.
PARTIAL_AGE_S = 600.0


def sweep_partial(results: ResultStore, jobs: JobStore, now: float | None = None) -> list[str]:
    """Remove the files of every job older than `PARTIAL_AGE_S` with no row; their ids."""
    now = time.time() if now is None else now
    removed = []
    for job_id in results.stored_before(now - PARTIAL_AGE_S):
        try:
            if jobs.get(job_id) is None and results.delete(job_id):
                removed.append(job_id)
        except OSError as e:  # removed meanwhile, or not ours to remove: the next sweep sees
            log.warning("cannot remove half-written job %s: %s", job_id, e)
    if removed:
        log.warning("removed %d half-written job(s) a stopped server left: %s", len(removed),
                    ", ".join(removed[:10]))
    return removed
