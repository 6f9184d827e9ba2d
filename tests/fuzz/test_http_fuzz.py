"""`POST /v1/jobs` under generated input, against one live server (a subprocess on
loopback, tests/service_fixtures.py), its tiny model's worker running what it accepts.

Properties, per case: the answer is 2xx or 4xx, never 5xx; a 4xx carries a JSON body
`{"detail": {"message", "where", "type"}}` naming the problem; the answer comes within the
deadline (no hang). After the run: the server still serves a normal job, it wrote
nothing outside its home (its working directory is an empty folder), every accepted
job's files are in its own folder under the home's `jobs/`, and the server's and the
worker's resident memory grew by less than the stated margin over the run.

Bodies: JSON documents from the schema, JSON and tensor mutations of recorded graphs
(sent multipart when they carry tensors), and multipart framing mutations (boundaries,
part names, headers, truncation). CI size: 300 + 500 + 200 + 200 = 1,200 cases.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from graph_strategies import Recorded, cases, mutated_json, mutated_tensors, schema_documents
from hypothesis import given
from hypothesis import strategies as st

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.server.results import check_job_id
from service_fixtures import TERMINAL, small_graph

MiB = 2**20
RSS_MARGIN = 24 * MiB  # server + worker growth allowed over the whole run (see docs/security.md)


@dataclass
class Live:
    server: Any  # service_fixtures.Server
    http: httpx.Client
    cwd: Path
    answers: dict[int, int]  # status code -> count


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def live(start_server: Callable[..., Any], tiny_config: Callable[..., str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    cwd = tmp_path_factory.mktemp("fuzz-cwd")
    server = start_server("fuzz", tiny_config(run_seconds=5), cwd=cwd)
    key = server.keys.create("fuzzer")[1]
    with server.client(key) as http:
        yield Live(server, http, cwd, {})
    server.stop()


def send(live: Live, body: bytes, content_type: str) -> None:
    r = live.http.post("/v1/jobs", content=body, headers={"Content-Type": content_type}, timeout=60)
    live.answers[r.status_code] = live.answers.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert isinstance(detail["message"], str) and detail["message"], detail
        assert detail["type"] and "where" in detail, detail
    else:
        assert r.json()["status"] in ("QUEUED", "RUNNING", *TERMINAL), r.text


BOUNDARY = "fuzzboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
HEADERS = ["", "Content-Length: 5\r\n", "X: " + "y" * 9000 + "\r\n"]
CTYPES = ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=other",
          "multipart/form-data; boundary=" + "b" * 200, "text/plain", "", "application/jsonx",
          "multipart/mixed; boundary=fuzzboundary", "application/x-www-form-urlencoded"]


def multipart(parts: list[tuple[str, bytes]], boundary: str = BOUNDARY, headers: str = "") -> bytes:
    out = b""
    for name, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n{headers}\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_case(live: Live, doc: Any, tensors: bytes | None) -> None:
    data = json.dumps(doc).encode()
    if tensors is None:
        send(live, data, "application/json")
    else:
        send(live, multipart([("graph", data), ("tensors", tensors)]), MULTIPART)


@st.composite
def framings(draw: st.DrawFn, recorded: Recorded) -> tuple[bytes, str]:
    """A recorded graph in a multipart body whose framing is wrong in one way."""
    doc, tensors = draw(st.sampled_from(recorded))
    parts = [("graph", json.dumps(doc).encode()), ("tensors", tensors or b"")]
    kind = draw(st.sampled_from(["names", "truncate", "headers", "many", "ctype", "junk"]))
    ctype = MULTIPART
    if kind == "names":
        parts = [(draw(st.sampled_from(["graph", "tensors", "", "graph\"", "x" * 300, "../graph"])), d)
                 for _, d in parts]
    body = multipart(parts, headers=draw(st.sampled_from(HEADERS)) if kind == "headers" else "")
    if kind == "ctype":
        ctype = draw(st.sampled_from(CTYPES))
    elif kind == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "many":
        body = multipart(parts * draw(st.integers(2, 5)))
    elif kind == "junk":
        body = draw(st.binary(max_size=200)) + body
    return body, ctype


def test_post_jobs_never_fails_the_server(live: Live, recorded: Recorded, fuzz_lm: LanguageModel) -> None:
    server_pid, worker_pid = live.server.proc.pid, live.server.worker_pid("tiny")
    # Warm up: the first requests load code and caches that stay (not a leak).
    for doc, tensors in recorded * 10:
        post_case(live, doc, tensors)
    before = rss(server_pid) + rss(worker_pid)

    @cases(300)
    @given(schema_documents)
    def schema(doc: Any) -> None:
        send(live, json.dumps(doc).encode(), "application/json")

    @cases(500)
    @given(mutated_json(recorded))
    def mutations(case: tuple[dict, bytes | None]) -> None:
        post_case(live, *case)

    @cases(200)
    @given(mutated_tensors(recorded))
    def tensors(case: tuple[dict, bytes | None]) -> None:
        post_case(live, *case)

    @cases(200)
    @given(framings(recorded))
    def framing(case: tuple[bytes, str]) -> None:
        send(live, *case)

    steps = []  # server + worker RSS growth after each property: a leak climbs, a cache levels off
    for prop in (schema, mutations, tensors, framing):
        prop()
        steps.append(f"{(rss(server_pid) + rss(worker_pid) - before) / MiB:+.1f}")
    refused = sum(n for status, n in live.answers.items() if status >= 400)
    assert live.answers.get(202, 0) > 0 and refused > 0, live.answers
    assert worker_pid == live.server.worker_pid("tiny"), "the worker restarted: a fuzz case killed it"
    grown = rss(server_pid) + rss(worker_pid) - before
    print(f"\nfuzz answers {dict(sorted(live.answers.items()))} ({sum(live.answers.values())} in all); "
          f"server + worker RSS {before / MiB:.1f} MiB, grew {grown / MiB:.2f} MiB "
          f"(after each property: {' '.join(steps)} MiB)")  # shown with -s
    assert grown < RSS_MARGIN, f"server + worker RSS grew {grown / MiB:.1f} MiB over the fuzz run"
    # Still serving a normal job, with the right result.
    graph_json, tensor_bytes = wire.encode(small_graph(fuzz_lm))
    files = {"graph": ("g.json", graph_json, "application/json"), "tensors": ("t", tensor_bytes or b"", "x")}
    deadline = time.monotonic() + 120
    while (r := live.http.post("/v1/jobs", files=files)).status_code == 429:  # others still queued
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    while (info := live.http.get(f"/v1/jobs/{job}").json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert info["status"] == "COMPLETED", info


def test_nothing_written_outside_the_jobs_folders(live: Live) -> None:
    """After the fuzz run: the server's working directory is empty, and its home holds
    only its database, config and log, and `jobs/<id>/<a job file>`."""
    assert not list(live.cwd.iterdir())
    home = live.server.home
    files = {"graph.json", "tensors.safetensors", "result.safetensors"}
    for p in home.rglob("*"):
        rel = p.relative_to(home)
        if rel.parts[0] == "jobs":
            assert len(rel.parts) < 3 or (len(rel.parts) == 3 and rel.name in files), rel
            assert len(rel.parts) < 2 or check_job_id(rel.parts[1])
        else:
            assert rel.name in ("server.toml", "server.log") or rel.name.startswith("nnglass.db"), rel
