"""What the fault tests share: submitting graphs as the client does, waiting for a job,
the graphs they run (small, big, hanging), and what a process holds open (/proc)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from saved_values import assert_bitwise_equal  # tests/saved_values.py
from service_fixtures import recording

TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
PROMPTS = ["hello there", "goodbye you", "how are you", "whats up yo"]  # one width: one shared pass


def record(lm: LanguageModel, prompt: str = PROMPTS[0]) -> Graph:
    """A forward-only graph that reads and writes (so a wrong row or a lost setter shows)."""
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output[:, -1] = 0
        lm.model.layers[1].output.save()
        lm.output.logits[:, -1].save()
    return tracer.graph


def big(lm: LanguageModel, mib: int) -> Graph:
    """A graph whose result is about `mib` MiB (a hidden state, broadcast and scaled by
    position, so a torn or misplaced chunk changes the values)."""
    with recording(lm.trace(PROMPTS[0])) as tracer:
        h = lm.model.layers[0].output[0, -1]  # 32 floats
        ramp = h[:1].expand(mib * 8192).contiguous().cumsum(0).unsqueeze(1)
        (ramp * h).save()  # mib MiB of float32, a different value per row
    return tracer.graph


def encode(graph: Graph) -> tuple[bytes, bytes | None]:
    return wire.encode(graph)


def post(http: httpx.Client, graph: Graph) -> httpx.Response:
    """Submit a graph as the client does (multipart: the token ids travel as tensors)."""
    json_bytes, tensors = wire.encode(graph)
    if tensors is None:
        return http.post("/v1/jobs", content=json_bytes, headers={"Content-Type": "application/json"})
    files = {"graph": ("graph.json", json_bytes, "application/json"),
             "tensors": ("t.safetensors", tensors, "application/octet-stream")}
    return http.post("/v1/jobs", files=files)


def submit(http: httpx.Client, graph: Graph) -> str:
    r = post(http, graph)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_for(http: httpx.Client, job: str, statuses: tuple[str, ...] = TERMINAL,
             timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/jobs/{job}")
        info = r.json()
        if r.status_code == 503:  # the database is back only once the pool reconnects: as asked, later
            assert "Retry-After" in r.headers, r.text
        elif info["status"] in statuses:
            return info
        assert time.monotonic() < deadline, f"job still {info} after {timeout} s"
        time.sleep(0.05)


def assert_as_alone(http: httpx.Client, job: str, lm: LanguageModel, graph: Graph) -> None:
    """The job completed, and its saved values are bitwise what the graph gives run alone."""
    info = wait_for(http, job)
    assert info["status"] == "COMPLETED", info
    assert_bitwise_equal(decode_results(http.get(f"/v1/jobs/{job}/result").content), lm.run_graph(graph))


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
