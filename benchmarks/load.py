"""A bounded loopback load generator against the embedded server (issue 16, item 3).

    python benchmarks/load.py                      # 200 clients x 10 jobs, sharing on and off
    python benchmarks/load.py --clients 20 --jobs 5 --share 8

Each client is a thread with its own API key and HTTP connection; all start together,
their jobs recorded (and run locally, for the check) before the clock starts, so the
server meets every client at once. Its jobs cycle through
five kinds: a trace saving a hidden state, a generation (3 new tokens), a session of two
traces (the second patched with the first's value), an error (an index past the prompt),
and a cancel (a slow job cancelled once it is queued or running). Every prompt is unique
to its client and job, and each result is compared with the same graph run locally
(`lm.run_graph`, computed before the load starts), so a result delivered to the
wrong key, or another job's result, shows as a mismatch. A client waits for its job on
the job's event stream, as the real client does (polling only if the stream breaks).

Checks: 0 lost (every accepted job ends COMPLETED, ERROR or CANCELLED and is listed under
its key), 0 wrong (values allclose to the local run; an error job ends ERROR at its line;
a cancel ends CANCELLED, or COMPLETED when it finished first), 0 stuck (every job ends
within `--timeout`). Reports p50/p99 of submit-to-terminal latency and jobs/s, prints a
table and writes JSON (`--out`). `main` returns a nonzero exit status when a check fails.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _service_server import save_tiny
from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.server.auth import KeyStore

TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
POLL_S = 0.5  # how long a client waits before asking again when its event stream broke
KINDS = ("trace", "generate", "session", "error", "cancel")
TOML = """[server]
host = "127.0.0.1"
port = {port}
home = "{home}"
max_queued_per_key = 64

[[models]]
name = "tiny"
source = "{model}"
threads = 1
share_jobs = {share}

[models.policy.limits]
run_seconds = 60
new_tokens = 8
"""


def _recording(block: Any) -> Any:
    block.__enter__()
    return block


def _leave(block: Any) -> None:
    block.__exit__(KeyError, KeyError(), None)  # leave without running: the graph stays recorded


def build(lm: LanguageModel, kind: str, prompt: str) -> Graph:
    """The graph of one job of `kind` on `prompt` (recorded, not run)."""
    if kind == "session":
        session = _recording(lm.session())
        with lm.trace(prompt):
            h = lm.model.layers[0].output[:, -1]
        with lm.trace(prompt[::-1]):
            lm.model.layers[0].output[:, -1] = h
            lm.output.logits[:, -1].save()
        _leave(session)
        return Graph(model="tiny", mode="session", children=[t.graph for t in session.tracers])
    block = _recording(lm.generate(prompt, max_new_tokens=3) if kind == "generate" else lm.trace(prompt))
    if kind == "generate":
        lm.lm_head.output[:, -1].argmax(-1).save()
        block.result.save()
    elif kind == "error":
        lm.model.layers[0].output[0, 999].save()  # the prompt is shorter: fails at this line
    elif kind == "cancel":
        m = lm.model.layers[0].output.sum().expand(600, 600).contiguous()
        for _ in range(4):
            m = m @ m
        m.sum().save()
    else:
        lm.model.layers[1].output[:, -1] += 1.0
        lm.model.norm.output.save()
    _leave(block)
    return block.graph


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, job: str) -> None:
        with self.lock:
            getattr(self, what).append(job)


@dataclass
class Planned:
    """One job of one client, recorded and run locally before the load starts."""

    kind: str
    graph: Graph
    expected: Any  # the local run's values (None: an error or a cancel)
    body: tuple[bytes, bytes | None]  # the graph on the wire


def plan(lm: LanguageModel, index: int, jobs: int) -> list[Planned]:
    """Client `index`'s jobs: every prompt unique to its client and job, one width for all
    (jobs may share a pass)."""
    out = []
    for k in range(jobs):
        kind = KINDS[(index + k) % len(KINDS)]
        graph = build(lm, kind, f"c{index:04d}j{k:03d}")
        checked = kind in ("trace", "generate", "session")
        expected = lm.run_graph(wire.roundtrip(graph)) if checked else None
        out.append(Planned(kind, graph, expected, wire.encode(graph)))
    return out


def client(url: str, key: str, planned: list[Planned], index: int, tally: Tally, timeout: float,
           go: threading.Event) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        go.wait()
        mine = [job for k, p in enumerate(planned)
                if (job := one_job(http, http, p, f"{index}/{k}", tally, timeout))]
        check_listed(http, mine, tally)


def one_job(submit_to: httpx.Client, watch: httpx.Client, job_plan: Planned, label: str, tally: Tally,
            timeout: float) -> str | None:
    """Submit one planned job through `submit_to`; cancel (a cancel job), follow and check
    it through `watch` (the same client, or another frontend's), noting the outcome in
    `tally`; the job's id, or None if the submission was refused."""
    kind, graph, expected = job_plan.kind, job_plan.graph, job_plan.expected
    graph_json, tensors = job_plan.body
    files = {"graph": ("g.json", graph_json, "application/json")}
    if tensors is not None:
        files["tensors"] = ("t.safetensors", tensors, "application/octet-stream")
    start = time.monotonic()
    r = submit_to.post("/v1/jobs", files=files)
    if r.status_code != 202:
        tally.note("wrong", f"{label} {kind}: submit answered {r.status_code} {r.text[:200]}")
        return None
    job = r.json()["id"]
    if kind == "cancel":
        watch.delete(f"/v1/jobs/{job}")
    info = follow(watch, job, start + timeout)
    if info["status"] not in TERMINAL:
        tally.note("stuck", f"{job} {kind} {info['status']}")
        return job
    with tally.lock:
        tally.latencies.append(time.monotonic() - start)
        outcome = f"{kind}:{info['status']}"
        tally.by_kind[outcome] = tally.by_kind.get(outcome, 0) + 1
    if not _as_expected(watch, job, kind, info, expected, graph):
        tally.note("wrong", f"{job} {kind} {info['status']} {str(info.get('error'))[:200]}")
    return job


def check_listed(http: httpx.Client, mine: list[str], tally: Tally) -> None:
    """Every job of this client is listed under its key (else: lost)."""
    listed = {j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]}
    for job in mine:
        if job not in listed:
            tally.note("lost", f"{job} (not listed on {http.base_url})")


def follow(http: httpx.Client, job: str, deadline: float) -> dict[str, Any]:
    """The job's terminal status, as the real client learns it: from its event stream
    (`/v1/jobs/{id}/events`), polling only when the stream breaks; its last status at
    `deadline`."""
    info: dict[str, Any] = {"status": "unknown"}
    while time.monotonic() < deadline:
        read = max(0.1, deadline - time.monotonic())
        try:
            with http.stream("GET", f"/v1/jobs/{job}/events", timeout=httpx.Timeout(60, read=read)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        info = json.loads(line[6:])
                        if info["status"] in TERMINAL:
                            return info
        except httpx.HTTPError:
            pass
        info = http.get(f"/v1/jobs/{job}").json()
        if info["status"] in TERMINAL:
            return info
        time.sleep(POLL_S)
    return info


def _as_expected(http: httpx.Client, job: str, kind: str, info: dict, expected: Any, graph: Graph) -> bool:
    status = info["status"]
    if kind == "cancel":
        return status in ("CANCELLED", "COMPLETED")
    if kind == "error":
        error = info.get("error") or {}
        return status == "ERROR" and error.get("where") == graph.nodes[-1].where
    if status != "COMPLETED":
        return False
    r = http.get(f"/v1/jobs/{job}/result")
    return r.status_code == 200 and same(decode_results(r.content), expected)


def start_server(home: Path, model: Path, share: int) -> tuple[subprocess.Popen, str, KeyStore]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "server.toml").write_text(TOML.format(port=port, home=home, model=model, share=share))
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "nnglass", "serve", "--config", str(home / "server.toml")],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["models"].get("tiny") == "ready":
                return proc, url, KeyStore(home / "nnglass.db")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready: " + (home / "server.log").read_text()[-2000:])


def run(clients: int, jobs: int, share: int, timeout: float, model: Path, workdir: Path) -> dict[str, Any]:
    """One load run against a fresh server; the measurements and the checks' findings."""
    home = Path(tempfile.mkdtemp(prefix=f"load-share{share}-", dir=workdir))
    proc, url, keys = start_server(home, model, share)
    try:
        lm = LanguageModel(str(model), name="tiny")
        plans = [plan(lm, i, jobs) for i in range(clients)]  # before the clock: clients only send
        tally, threads, go = Tally(), [], threading.Event()
        ids = [keys.create(f"client{i}")[1] for i in range(clients)]
        for i in range(clients):
            t = threading.Thread(target=client, args=(url, ids[i], plans[i], i, tally, timeout, go),
                                 daemon=True)
            t.start()
            threads.append(t)
        start = time.monotonic()
        go.set()
        for t in threads:
            t.join(timeout + 600)
        wall = time.monotonic() - start
        shared = _metric(url, ids[0], "nnglass_shared_jobs_total")
        restarts = _metric(url, ids[0], "nnglass_worker_restarts_total")
        auth = {"Authorization": f"Bearer {ids[0]}"}
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()
        batching = next(m for m in models if m["name"] == "tiny")["batching"]
    finally:
        proc.terminate()
        proc.wait(30)
    lat = sorted(tally.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"clients": clients, "jobs_per_client": jobs, "share_jobs": share, "jobs": clients * jobs,
            "ended": len(lat), "lost": tally.lost, "wrong": tally.wrong, "stuck": tally.stuck,
            "p50_s": pct(0.50), "p99_s": pct(0.99), "wall_s": wall, "jobs_per_s": len(lat) / wall,
            "shared_jobs": shared, "passes": batching["passes"],
            "jobs_per_pass": batching["mean_jobs_per_pass"],
            "worker_restarts": restarts, "outcomes": dict(sorted(tally.by_kind.items()))}


def _metric(url: str, key: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] == name:
            total += float(value)
    return total


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| share_jobs | clients x jobs | ended | lost | wrong | stuck | p50 s | p99 s | jobs/s | shared "
           "| passes | jobs/pass | worker restarts |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['share_jobs']} | {r['clients']} x {r['jobs_per_client']} | {r['ended']} | "
                   f"{len(r['lost'])} | "
                   f"{len(r['wrong'])} | {len(r['stuck'])} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                   f"{r['jobs_per_s']:.1f} | {r['shared_jobs']:.0f} | {r['passes']} | {r['jobs_per_pass']} | "
                   f"{r['worker_restarts']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--share", type=int, nargs="+", default=[8, 1], help="share_jobs values to run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a job counts as stuck")
    parser.add_argument("--out", type=Path, default=Path(".bench/load.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="nnglass-load-") as tmp:
        model = Path(tmp) / "tiny"
        save_tiny(model)
        rows = [run(args.clients, args.jobs, share, args.timeout, model, Path(tmp)) for share in args.share]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    for r in rows:
        for what in ("lost", "wrong", "stuck"):
            for line in r[what][:5]:
                print(f"{what}: {line}", file=sys.stderr)
    return 1 if any(r["lost"] or r["wrong"] or r["stuck"] or r["ended"] < r["jobs"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
