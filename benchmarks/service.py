"""The service's overheads: remote - local latency of a tiny job, and a 100 MB result download.

    python benchmarks/service.py [--runs 100] [--warmup 10] [--mb 100] [--downloads 15]
                                 [--no-tmpfs] [--no-write]

Method. A random 2-layer Llama (hidden 32, vocab 100, char tokenizer) is saved to a temp dir; a
real server (``_service_server.py``: ``nnglass serve --config``'s app, plus a plain static-file
route) starts on a free loopback port with its own temp ``NNGLASS_HOME`` in the system temp dir
(on disk, like a real home) and a key made with ``KeyStore``. Everything is warmed first.

1. Latency. ``--runs`` rounds, the order rotating, of the same one-save trace
   (``lm.model.layers[0].output.save()`` on one prompt) run locally, with ``remote=True`` through
   the real client, and as the same job through raw httpx calls that mirror the client (POST the
   wire bytes, follow the SSE stream, GET the result and decode it). remote - local is taken per
   round (p50, p95). The raw job is split into phases: submit = POST until its 202 (client
   clock); queue = queued_at → started_at, run = started_at → finished_at (the job's server
   timestamps); notify = finished_at → the client reads COMPLETED on the stream; download = GET
   result + decode. A raw stream silent for ``STALL_S`` is dropped for status polls and the job
   counted as stalled. After each round one fsync and one SQLite WAL commit are timed alone in the
   home. To price the durable writes it all runs again on a second server whose home is on tmpfs
   (``/dev/shm``: fsync is free there). One ``RemoteBackend()`` is timed alone too.
2. Download. One job saves ``logits.expand(n, ...).contiguous()`` (``--mb`` MB of float32;
   ``result_bytes`` is raised to allow it). In ``--downloads`` rounds (the order rotating) its
   ``GET /v1/jobs/{id}/result``, ``GET /static/{id}`` (a bare Starlette ``FileResponse`` of the
   same file, in the same process and event loop: see ``_service_server.py``) and
   ``GET /static-mw/{id}`` (the same behind a pass-through ``BaseHTTPMiddleware``) are streamed
   with httpx and discarded. Throughput is bytes / time (median; ratios are medians of per-round
   ratios, which cancel slow drift). Memory: the server's VmRSS growth over its value before the
   request (``/proc/<pid>/status``, sampled every ms in a thread). The server's CPU time per
   download (``/proc/<pid>/stat``) compares the routes' costs, immune to other load on the machine.
   The real client's ``job.result()`` is timed once and its tensor compared with the local one.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

import nnglass
from _report import save_json
from _service_report import DOCS, render, write_docs
from _service_server import Server, save_tiny
from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.remote.client import RemoteBackend

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "service.json"
PROMPT = "The truth is the"  # 16 tokens with the char tokenizer
STALL_S = 2.0
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")


# --- raw jobs, as the client sends and follows them -------------------------------------------


def submit(http: httpx.Client, graph: Graph) -> str:
    json_bytes, tensor_bytes = wire.encode(graph)  # the body RemoteBackend.submit sends
    if tensor_bytes is None:
        body: dict[str, Any] = {"content": json_bytes, "headers": {"Content-Type": "application/json"}}
    else:
        body = {
            "files": {
                "graph": ("graph.json", json_bytes, "application/json"),
                "tensors": ("tensors.safetensors", tensor_bytes, "application/octet-stream"),
            }
        }
    r = http.post("/v1/jobs", **body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def follow(http: httpx.Client, job_id: str) -> tuple[dict[str, Any], bool]:
    """The terminal status from the SSE stream; (status, True) if the stream stalled."""
    try:
        with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(60.0, read=STALL_S)) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and (info := json.loads(line[5:]))["status"] in TERMINAL:
                    return info, False
    except httpx.ReadTimeout:
        pass
    while (info := http.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
        time.sleep(0.005)
    return info, True


def phases(http: httpx.Client, graph: Graph) -> dict[str, float]:
    t0 = time.time()
    job_id = submit(http, graph)
    t1 = time.time()
    info, stalled = follow(http, job_id)
    t2 = time.time()
    decode_results(http.get(f"/v1/jobs/{job_id}/result").content)
    t3 = time.time()
    return {"submit": t1 - t0, "queue": info["started_at"] - info["queued_at"],
            "run": info["finished_at"] - info["started_at"], "notify": t2 - info["finished_at"],
            "download": t3 - t2, "total": t3 - t0, "stalled": float(stalled)}


# --- measures ---------------------------------------------------------------------------------


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "n": len(ms)}


def elapsed_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    got = fn()
    return (time.perf_counter() - t) * 1e3, got


def latency(lm: LanguageModel, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of (local trace, the same trace with remote=True, the same job through raw httpx), the
    order rotating; after each round one probe fsync and one probe commit in the home (the disk's
    latency drifts: all of these sample the same minutes)."""
    nnglass.configure(host=server.url, api_key=server.key)
    with lm.trace(PROMPT) as tracer:
        lm.model.layers[0].output.save()

    def run(remote: bool) -> torch.Tensor:
        with lm.trace(PROMPT, remote=remote):
            h = lm.model.layers[0].output.save()
        return h.value

    same = torch.equal(run(False), run(True))
    kinds: dict[str, Callable[[], Any]] = {
        "local": lambda: run(False), "remote": lambda: run(True),
        "raw": lambda: phases(server.http, tracer.graph),
    }
    for _ in range(args.warmup):
        for fn in kinds.values():
            fn()
    probe, ms, raw, probes = Probes(server.home), {k: [] for k in kinds}, [], []
    for i in range(args.runs):
        for kind in list(kinds)[i % 3 :] + list(kinds)[: i % 3]:
            took, got = elapsed_ms(kinds[kind])
            ms[kind].append(took)
            if kind == "raw":
                raw.append(got)
        probes.append(probe())
    probe.close()
    return {
        "local_ms": stats(ms["local"]), "remote_ms": stats(ms["remote"]),
        "remote_minus_local_ms": stats([r - lo for r, lo in zip(ms["remote"], ms["local"])]),
        "stalled": sum(r > STALL_S * 1e3 for r in ms["remote"]), "check": "exact" if same else "MISMATCH",
        "phases": {k: stats([r[k] * 1e3 for r in raw]) for k in raw[0] if k != "stalled"},
        "raw_stalled": int(sum(r["stalled"] for r in raw)), "stall_s": STALL_S,
        "durability_ms": {k: stats([p[k] for p in probes]) for k in probes[0]},
        "backend_ms": stats([elapsed_ms(lambda: RemoteBackend(server.url, api_key=server.key).close())[0]
                             for _ in range(20)]),
    }


class Probes:
    """What a job's durable writes cost alone, in `folder`: a new small file written, fsynced and
    renamed into place (as DirResultStore does), and one SQLite commit (WAL, synchronous=FULL)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "probe"
        self.folder.mkdir()
        self.db = sqlite3.connect(self.folder / "probe.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE t (v REAL)")
        self.db.execute("INSERT INTO t VALUES (0)")

    def __call__(self) -> dict[str, float]:
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            f.write(b"x" * 512)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / "file")
        t1 = time.perf_counter()
        self.db.execute("UPDATE t SET v = v + 1")
        return {"fsync": (t1 - t0) * 1e3, "sqlite_commit": (time.perf_counter() - t1) * 1e3}

    def close(self) -> None:
        self.db.close()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu(pid: int) -> float:
    """CPU seconds `pid` has used, all threads (utime + stime from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def download(http: httpx.Client, path: str, pid: int) -> dict[str, float]:
    """Seconds to stream `path` (discarding it), the server's VmRSS growth and CPU seconds meanwhile."""
    base, peak, done, cpu0 = rss(pid), [0], threading.Event(), cpu(pid)

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    with http.stream("GET", path) as r:
        assert r.status_code == 200, r.read()
        got = sum(len(chunk) for chunk in r.iter_raw())
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    assert got == int(r.headers["Content-Length"])
    return {"s": seconds, "rss": max(peak[0], rss(pid)) - base, "cpu": cpu(pid) - cpu0}


def big_download(lm: LanguageModel, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    n = round(args.mb * 1e6 / (len(PROMPT) * lm.config.vocab_size * 4))
    with lm.trace(PROMPT) as tracer:
        big = lm.output.logits.expand(n, -1, -1).contiguous().save()
    job_id = submit(server.http, tracer.graph)
    info, _ = follow(server.http, job_id)
    assert info["status"] == "COMPLETED", info
    size = int(info["result_bytes"])
    routes = {"result": f"/v1/jobs/{job_id}/result", "static": f"/static/{job_id}",
              "static_mw": f"/static-mw/{job_id}"}
    names = list(routes)
    got: dict[str, list[dict[str, float]]] = {k: [] for k in routes}
    download(server.http, routes["static"], server.proc.pid)  # warm: page cache, connection
    for i in range(args.downloads):
        for name in names[i % 3 :] + names[: i % 3]:  # each route takes each place in turn
            got[name].append(download(server.http, routes[name], server.proc.pid))
    out: dict[str, Any] = {"bytes": size}
    for name, runs in got.items():
        mbps = [size / 1e6 / d["s"] for d in runs]
        out[name] = {"mb_s": float(np.median(mbps)), "mb_s_all": mbps,
                     "rss_growth_mb": max(d["rss"] for d in runs) / 2**20,
                     "cpu_ms": float(np.median([d["cpu"] for d in runs])) * 1e3}

    def paired(a: str, b: str, key: str) -> float:  # median over rounds of b's key / a's key
        return float(np.median([rb[key] / ra[key] for ra, rb in zip(got[a], got[b])]))

    out["ratio"], out["mw_ratio"] = paired("result", "static", "s"), paired("static_mw", "static", "s")
    out["cpu_ratio"] = paired("result", "static", "cpu")  # MB per server CPU second, result ÷ static
    t = time.perf_counter()
    values = RemoteBackend(server.url, api_key=server.key, progress=False).job(job_id).result()
    out["client_mb_s"] = size / 1e6 / (time.perf_counter() - t)
    out["check"] = "exact" if torch.equal(next(iter(values.values())), big.value) else "MISMATCH"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="measured jobs per latency scenario")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--mb", type=float, default=100.0, help="size of the downloaded tensor")
    p.add_argument("--downloads", type=int, default=15, help="downloads per route")
    p.add_argument("--no-tmpfs", action="store_true", help="skip the diagnostic run on /dev/shm")
    p.add_argument("--no-write", action="store_true", help="print only; keep json and docs")
    args = p.parse_args()
    torch.set_num_threads(1)
    load = round(os.getloadavg()[0], 2)  # other work on the machine skews every number here
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nnglass-bench-") as tmp:
        model, home = Path(tmp) / "tiny", Path(tmp) / "home"
        home.mkdir()
        save_tiny(model)
        lm = LanguageModel(str(model), name="tiny")
        result_bytes = int(args.mb * 1e6) + 2**20
        server = Server(home, model, result_bytes)
        try:
            print("latency ...", file=sys.stderr, flush=True)
            res["latency"] = {"disk": latency(lm, server, args)}
            print("download ...", file=sys.stderr, flush=True)
            res["download"] = big_download(lm, server, args)
        finally:
            server.stop()
        if not args.no_tmpfs and Path("/dev/shm").is_dir():
            print("latency with the home on tmpfs ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="nnglass-bench-", dir="/dev/shm") as shm:
                server = Server(Path(shm), model, result_bytes)
                try:
                    res["latency"]["tmpfs"] = latency(lm, server, args)
                finally:
                    server.stop()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "load": load,
           "torch": torch.__version__, "nnglass": nnglass.__version__, "stall_s": STALL_S,
           "command": " ".join(["python benchmarks/service.py", *sys.argv[1:]])}
    md = render(res)
    print(md)
    if not args.no_write:
        save_json(RESULTS, env, res)
        write_docs(md, env, res)
        root = HERE.parent
        print(f"\nwrote {RESULTS.relative_to(root)} and {DOCS.relative_to(root)}", file=sys.stderr)


if __name__ == "__main__":
    main()
