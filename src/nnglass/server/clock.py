"""The service's wall clock: epoch seconds that never go backwards in this process.

Invariants:
- Every job timestamp the service writes (created, queued, started, finished, expires)
  and every "now" it compares them with comes from `now()`. When the system clock steps
  back (NTP, an operator, a VM restored), `now()` holds at the latest value it gave
  until the clock catches up: a job's timestamps stay in order and no duration the API
  or the dashboard shows is negative; an expiry is never reached early, not even after
  the clock is corrected forward again (a job that finished during the step was stamped
  with the held value, not the stepped-back one). A step forward is time passing.
- Deadlines and timeouts use `time.monotonic`, which no step moves. Leases between
  frontends use the database's clock (pg_queue.py), never a frontend's.
- Held within one process: a server restarted while the clock is behind starts again
  from the clock.
"""

from __future__ import annotations

import threading
import time

__all__ = ["now"]

_lock = threading.Lock()
_latest = 0.0
wall = time.time  # the source (tests step it back)


def now() -> float:
    """The wall clock, or the latest value given when the clock has stepped back."""
    global _latest
    t = wall()
    with _lock:
        if t > _latest:
            _latest = t
        return _latest
