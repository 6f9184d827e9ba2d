"""Tests only: environment variables a worker child reads to stand in for faults.

A job named by NNGLASS_WORKER_TEST_HANG sleeps, and one named by
NNGLASS_WORKER_TEST_CRASH makes the child exit at once; alone or in a shared batch,
before any hook runs. Each names a job id, or the absolute path of a file of job ids,
read at each request (so a server test can name a job once the server has given it its
id). While the file named by
NNGLASS_WORKER_TEST_GATE exists, each generation step waits after its step line, so a
test can see a job stream while it is still RUNNING (jobs beside a session's batch,
server/beside.py, do not wait: a test sees them end while a step is held).

Nothing here runs unless a variable is set; a job id never holds a "/", so an absolute
path is always a file of ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TEST_CRASH", "TEST_GATE", "TEST_HANG", "crash_or_hang", "gated_sender", "named_jobs"]

Send = Callable[[dict[str, Any]], None]

TEST_HANG = "NNGLASS_WORKER_TEST_HANG"  # the job with this id sleeps, outside any hook
TEST_CRASH = "NNGLASS_WORKER_TEST_CRASH"  # the job with this id makes the worker exit
TEST_GATE = "NNGLASS_WORKER_TEST_GATE"  # while this file exists, each step waits


def crash_or_hang(requests: list[Any]) -> None:
    """Tests only: stand in for a job that kills the worker without reaching a hook."""
    jobs = {str(r.get("job")) for r in requests if type(r) is dict}
    if jobs & named_jobs(TEST_CRASH):
        os._exit(70)
    if jobs & named_jobs(TEST_HANG):
        time.sleep(3600)


def gated_sender(send: Send | None) -> Send | None:
    """Tests only: with NNGLASS_WORKER_TEST_GATE set, each step line waits for its file to go."""
    gate = os.environ.get(TEST_GATE, "")
    if send is None or not os.path.isabs(gate):
        return send

    def waiting(message: dict[str, Any]) -> None:
        send(message)
        while os.path.exists(gate):
            time.sleep(0.01)

    return waiting


def named_jobs(var: str) -> set[str]:
    value = os.environ.get(var, "")
    if not os.path.isabs(value):  # a job id never holds a "/"
        return {value} if value else set()
    try:
        return set(Path(value).read_text().split())
    except OSError:
        return set()
