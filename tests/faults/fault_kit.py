"""What the fault tests share beyond tests/service_fixtures.py (which has the graphs they
record and the client side: post, submit, wait_for, assert_as_alone): a graph with a big
result, waiting for a condition, and what a process is and holds open (/proc)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from service_fixtures import PROMPTS, recording


def big(lm: LanguageModel, mib: int) -> Graph:
    """A graph whose result is about `mib` MiB (a hidden state, broadcast and scaled by
    position, so a torn or misplaced chunk changes the values)."""
    with recording(lm.trace(PROMPTS[0])) as tracer:
        h = lm.model.layers[0].output[0, -1]  # 32 floats
        ramp = h[:1].expand(mib * 8192).contiguous().cumsum(0).unsqueeze(1)
        (ramp * h).save()  # mib MiB of float32, a different value per row
    return tracer.graph


def until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")  # a zombie is dead, only not reaped yet
    return not state.exists() or state.read_text().split(") ")[-1][:1] != "Z"


def open_files(pid: int) -> list[str]:
    """What the process's file descriptors point at (Linux /proc)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return out


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))
