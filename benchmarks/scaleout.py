"""Scale-out on Ray: jobs/s of two replicas vs one, and the latency the cluster adds.

    python benchmarks/scaleout.py [--jobs 24] [--rounds 3] [--size 1000] [--products 4]
                                  [--runs 60] [--no-write]

Method. The tests' cluster (tests/ray_cluster.py: two `ray start` nodes on 127.0.0.2 and
127.0.0.3, token auth on, 6 logical CPUs each), the tests' PostgreSQL 15 and moto S3 server
(tests/components.py) and the tests' tiny random Llama. One `nnglass serve --config` with
`engine = "ray"`, `database = "postgresql://..."` and `results = "s3://..."` (the cluster
combination) serves the same weights as model `one` (`replicas = 1`) and as model `two`
(`replicas = 2`, `num_cpus = 4` each: one replica a node); `share_jobs = 1`, so no job
shares a pass and a replica runs one job at a time. A second server serves it as `tiny`
with the embedded default (subprocess workers, SQLite, a folder). All have `threads = 1`.

1. Throughput. In each of `--rounds` rounds, for `one` then `two`: `--jobs` jobs are
   submitted at once (one key, from one client), each a forward pass plus a chain of
   `--products` products of a `--size`² matrix (one thread: tens of ms of work in the
   worker, so the replicas, not the API process, are what the jobs wait for). jobs/s =
   jobs / (last finished_at - first created_at), the server's own timestamps. The ratio is
   taken per round (two ÷ one, the same minutes), and the median reported. Next to each
   round, the machine's own ceiling: the same matrix products without nnglass, `--jobs`
   of them in one plain process vs half each in two started together (from a barrier,
   imports done), one thread each: what two single-threaded workers can get from the
   cores left free at that moment.
2. Latency. `--runs` rounds, the order rotating, of one one-save trace
   (`lm.model.layers[0].output.save()`) run locally, with `remote=True` on the cluster
   server's `one` (Ray + PostgreSQL + S3), and with `remote=True` on the embedded server's
   `tiny`; remote - local per round (p50, p95). Remote values are checked bitwise against
   the local ones. Then `--runs` raw jobs on each (benchmarks/service.py's `phases`: POST,
   the SSE stream, GET result; queue/run from the job's own timestamps), to see where the
   time goes, and the CPU each server's API process spent per raw job meanwhile
   (/proc/PID/stat: its own threads, not its workers).

The machine has 2 cores shared with other work: two replicas can at best use both, next to
the API process, so the ratio is bounded by what the machine has free (the load average is
recorded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' cluster: the same commands
import nnglass  # noqa: E402
from _service_server import save_tiny  # noqa: E402
from components import Postgres, S3Server  # noqa: E402
from nnglass import LanguageModel  # noqa: E402
from nnglass.graph import wire  # noqa: E402
from nnglass.graph.ir import Graph  # noqa: E402
from nnglass.server.config import load_config  # noqa: E402
from nnglass.server.stores import open_keys  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402
from service import phases  # noqa: E402  (benchmarks/service.py: one raw job's phases)

RESULTS = HERE / "results" / "scaleout.json"
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
PROMPT = "hello world"
PHASES = ("submit", "queue", "run", "notify", "download", "total")


def server_toml(port: int, home: Path, model: Path, cluster: str) -> str:
    """The config; `cluster`: the `[server]` lines of the cluster combination ("": embedded)."""

    def block(name: str, replicas: int, cpus: int) -> str:
        resources = f"resources = {{num_cpus = {cpus}}}\n" if cluster else ""
        head = f'[[models]]\nname = "{name}"\nsource = "{model}"\nthreads = 1\nshare_jobs = 1\n'
        return f"{head}replicas = {replicas}\n{resources}[models.policy.limits]\nrun_seconds = 120\n\n"

    models = block("one", 1, 2) + block("two", 2, 4) if cluster else block("tiny", 1, 1)
    return (f'[server]\nhost = "127.0.0.1"\nport = {port}\nhome = "{home}"\nmax_queued_per_key = 1000\n'
            f"{cluster}\n{models}")


class Served:
    """`nnglass serve --config` in a subprocess, with one key."""

    def __init__(self, root: Path, name: str, model: Path, cluster: str = "",
                 env: dict[str, str] | None = None) -> None:
        self.home = root / name
        self.home.mkdir()
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        (self.home / "server.toml").write_text(server_toml(port, self.home, model, cluster))
        keys = open_keys(load_config(self.home / "server.toml"))
        self.key = keys.create("bench")[1]
        keys.close()
        log = open(self.home / "server.log", "ab")
        command = [sys.executable, "-m", "nnglass", "serve", "--config", str(self.home / "server.toml")]
        env = {**os.environ, **(env or {}), "NNGLASS_HOME": str(self.home)}
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        auth = {"Authorization": f"Bearer {self.key}"}
        self.http = httpx.Client(base_url=self.url, headers=auth, timeout=60)

    def wait_ready(self, alive: dict[str, int], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-3000:]
            try:
                models = {m["name"]: m["replicas_alive"] for m in self.http.get("/v1/models").json()}
                if all(models.get(k) == v for k, v in alive.items()):
                    return
            except (httpx.HTTPError, TypeError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready:\n" + (self.home / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def heavy(lm: LanguageModel, size: int, products: int) -> Graph:
    tracer = lm.trace(PROMPT)
    tracer.__enter__()
    try:
        m = lm.model.layers[0].output.sum().expand(size, size).contiguous() * 0
        for _ in range(products):
            m = m @ m
        m.sum().save()
    finally:
        tracer.__exit__(KeyError, KeyError(), None)  # recorded, not run here
    return tracer.graph


def jobs_per_s(served: Served, graph: Graph, n: int) -> float:
    json_bytes, tensors = wire.encode(graph)
    files = {"graph": ("graph.json", json_bytes, "application/json")}
    if tensors is not None:
        files["tensors"] = ("t.safetensors", tensors, "application/octet-stream")
    ids = []
    for _ in range(n):
        r = served.http.post("/v1/jobs", files=files)
        r.raise_for_status()
        ids.append(r.json()["id"])
    pending, infos = set(ids), {}
    while pending:
        time.sleep(0.1)
        for info in served.http.get("/v1/jobs", params={"limit": str(min(n, 100))}).json()["jobs"]:
            if info["id"] in pending and info["status"] in TERMINAL:
                pending.discard(info["id"])
                infos[info["id"]] = info
    assert all(i["status"] == "COMPLETED" for i in infos.values()), [i for i in infos.values()][:2]
    start = min(i["created_at"] for i in infos.values())
    return n / (max(i["finished_at"] for i in infos.values()) - start)


# One plain process of the ceiling: import, say ready, wait for "go", run its share of the
# products (the benchmark's job without nnglass), print when it ended.
_PLAIN = """
import sys, time, torch
torch.set_num_threads(1)
n, size, products = map(int, sys.argv[1:])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    m = torch.zeros(size, size)
    for _ in range(products):
        m = m @ m
print(time.time(), flush=True)
"""


def plain_jobs_per_s(procs: int, n: int, size: int, products: int) -> float:
    """`n` jobs' products in `procs` plain processes started together; jobs per second."""
    args = [sys.executable, "-c", _PLAIN, str(n // procs), str(size), str(products)]
    running = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    for proc in running:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    start = time.time()
    for proc in running:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    ends = [float(proc.communicate()[0]) for proc in running]
    return (n // procs) * procs / (max(ends) - start)


def floors(database: str, results: str, n: int) -> dict[str, float]:
    """p50 ms of one small S3 PUT and one PostgreSQL transaction, alone (what a job with a
    result over 64 KiB makes one of, and what every cluster job makes eight of, on its way:
    tests/server/test_pg_transactions.py)."""
    from nnglass.server.pg import Database
    from nnglass.server.s3 import S3ResultStore

    store, db = S3ResultStore(results), Database(database, max_size=1)
    put, tx = [], []
    for i in range(n):
        start = time.perf_counter()
        store.s3.put_object(Bucket=store.bucket, Key=f"floor/{i}", Body=b"x" * 200)
        put.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        with db.tx() as conn:
            conn.execute("SELECT 1")
        tx.append((time.perf_counter() - start) * 1e3)
    db.close()
    return {"s3_put_ms": float(np.median(put)), "pg_tx_ms": float(np.median(tx))}


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "n": len(ms)}


def latency(lms: dict[str, LanguageModel], ray: Served, embedded: Served, runs: int) -> dict[str, Any]:
    def run(where: Served | None) -> tuple[float, torch.Tensor]:
        lm = lms["tiny"] if where is embedded else lms["one"]
        if where is not None:
            nnglass.configure(host=where.url, api_key=where.key)
        start = time.perf_counter()
        with lm.trace(PROMPT, remote=where is not None):
            h = lm.model.layers[0].output.save()
        return (time.perf_counter() - start) * 1e3, h.value

    kinds: dict[str, Served | None] = {"local": None, "ray": ray, "embedded": embedded}
    reference = run(None)[1]
    exact = all(torch.equal(run(w)[1], reference) for w in (ray, embedded))
    for _ in range(5):
        for where in kinds.values():
            run(where)
    ms: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(runs):
        for kind in list(kinds)[i % 3 :] + list(kinds)[: i % 3]:
            ms[kind].append(run(kinds[kind])[0])
    graphs = {}
    for name, where in (("one", ray), ("tiny", embedded)):
        tracer = lms[name].trace(PROMPT)
        tracer.backend = nnglass.Recorder()  # recorded, not run here
        with tracer:
            lms[name].model.layers[0].output.save()
        graphs[name] = (where, tracer.graph)
    split: dict[str, list[dict[str, float]]] = {"one": [], "tiny": []}
    cpu = {name: cpu_s(where.proc.pid) for name, (where, _) in graphs.items()}
    for i in range(runs):  # where the time goes: raw httpx, the jobs' own timestamps
        for name in ("one", "tiny")[i % 2 :] + ("one", "tiny")[: i % 2]:
            where, graph = graphs[name]
            split[name].append(phases(where.http, graph))
    cpu = {name: (cpu_s(where.proc.pid) - cpu[name]) * 1e3 / runs for name, (where, _) in graphs.items()}
    return {
        "local_ms": stats(ms["local"]),
        "ray_minus_local_ms": stats([r - lo for r, lo in zip(ms["ray"], ms["local"])]),
        "embedded_minus_local_ms": stats([r - lo for r, lo in zip(ms["embedded"], ms["local"])]),
        "check": "exact" if exact else "MISMATCH",
        "phases_ms": {kind: {phase: float(np.percentile([x[phase] for x in rows], 50)) * 1e3
                             for phase in PHASES}
                      for kind, rows in (("ray", split["one"]), ("embedded", split["tiny"]))},
        "api_cpu_ms_per_job": {"ray": cpu["one"], "embedded": cpu["tiny"]},
    }


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process `pid` has used, its own threads only (the
    embedded server's worker subprocess and Ray's actors are not in it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def render(res: dict[str, Any]) -> str:
    t, lat = res["throughput"], res["latency"]
    lines = ["| replicas | jobs/s (median of rounds) | per round |", "|---|---|---|"]
    for model, count in (("one", 1), ("two", 2)):
        rounds = ", ".join(f"{x:.2f}" for x in t[model])
        lines.append(f"| {count} | {np.median(t[model]):.2f} | {rounds} |")
    ratio = res["ratio_median"]
    rounds = ", ".join(f"{r:.2f}" for r in t["ratios"])
    verdict = "met" if ratio >= 1.8 else "not met"
    plain = ", ".join(f"{r:.2f}" for r in t["plain_ratios"])
    lines += ["", f"two ÷ one, median of per-round ratios: **{ratio:.2f}x** (target ≥ 1.8x: {verdict}); "
              f"rounds: {rounds}", "",
              f"The machine's ceiling, the same products in two plain processes ÷ one, next to each round: "
              f"{res['plain_ratio_median']:.2f}x (rounds: {plain}); nnglass ÷ ceiling: "
              f"{ratio / res['plain_ratio_median']:.2f}.", "",
              "| remote - local, one-save trace | p50 ms | p95 ms |", "|---|---|---|"]
    for kind, label in (("embedded_minus_local_ms", "embedded default (subprocess worker)"),
                        ("ray_minus_local_ms", "cluster (Ray actor + PostgreSQL + moto S3)")):
        lines.append(f"| {label} | {lat[kind]['p50']:.1f} | {lat[kind]['p95']:.1f} |")
    lines += ["", "| raw job, p50 ms (server timestamps) | " + " | ".join(PHASES) + " |",
              "|---|" + "---:|" * len(PHASES)]
    for kind, label in (("embedded", "embedded default"), ("ray", "cluster")):
        lines.append(f"| {label} | " + " | ".join(f"{lat['phases_ms'][kind][p]:.1f}" for p in PHASES) + " |")
    cpu = lat["api_cpu_ms_per_job"]
    lines += ["", f"The API process's CPU per raw job (its own threads, over the raw jobs): embedded "
              f"{cpu['embedded']:.1f} ms, cluster {cpu['ray']:.1f} ms."]
    ray50, emb50 = lat["ray_minus_local_ms"]["p50"], lat["embedded_minus_local_ms"]["p50"]
    f = res["floors"]
    lines += ["", f"Alone, between the rounds: one small S3 PUT to moto {f['s3_put_ms']:.1f} ms, one "
              f"PostgreSQL transaction {f['pg_tx_ms']:.2f} ms (p50)."]
    verdict = "met" if ray50 <= 2 * emb50 else "not met"
    lines += ["", f"cluster ÷ embedded (p50): **{ray50 / emb50:.2f}x** (target ≤ 2x: {verdict}); "
              f"remote values vs local: {lat['check']}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--products", type=int, default=4)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--no-write", action="store_true", help="print only; keep the json")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="nnglass-scaleout-"))
    model = root / "tiny"
    save_tiny(model)
    load = os.getloadavg()[0]
    cluster, postgres, s3 = RayCluster(cpus_per_node=6), Postgres(), S3Server()
    servers: list[Served] = []
    try:
        cluster.start()
        postgres.start()
        s3.start()
        os.environ.update(s3.env)  # the servers, and the key store here, reach S3 with these
        database, results = postgres.fresh_database(), s3.url()
        lines = (f'engine = "ray"\nray_address = "{cluster.address}"\nray_node_ip = "127.0.0.2"\n'
                 f'database = "{database}"\nresults = "{results}"')
        ray = Served(root, "ray", model, lines, env=cluster.env)
        embedded = Served(root, "embedded", model)
        servers += [ray, embedded]
        ray.wait_ready({"one": 1, "two": 2})
        embedded.wait_ready({"tiny": 1})
        lms = {name: LanguageModel(str(model), name=name) for name in ("one", "two", "tiny")}
        graphs = {name: heavy(lms[name], args.size, args.products) for name in ("one", "two")}
        jobs_per_s(ray, graphs["one"], 4)  # warm both models' replicas
        jobs_per_s(ray, graphs["two"], 8)
        t: dict[str, list[float]] = {"one": [], "two": [], "ratios": [], "plain_one": [], "plain_two": [],
                                     "plain_ratios": []}
        for r in range(args.rounds):
            for name in ("one", "two"):
                t[name].append(jobs_per_s(ray, graphs[name], args.jobs))
            t["ratios"].append(t["two"][-1] / t["one"][-1])
            plain = ((1, "plain_one"), (2, "plain_two"))
            for procs, name in plain if r % 2 else plain[::-1]:  # the order alternates
                t[name].append(plain_jobs_per_s(procs, args.jobs, args.size, args.products))
            t["plain_ratios"].append(t["plain_two"][-1] / t["plain_one"][-1])
        res = {"throughput": t, "ratio_median": float(np.median(t["ratios"])),
               "plain_ratio_median": float(np.median(t["plain_ratios"])),
               "latency": latency(lms, ray, embedded, args.runs),
               "floors": floors(database, results, args.runs)}
    finally:
        for s in servers:
            s.stop()
        s3.stop()
        postgres.stop()
        cluster.stop()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["env"] = {"when": when, "cores": os.cpu_count(), "load_average_at_start": load,
                  "torch": torch.__version__, "args": vars(args)}
    print(render(res))
    if not args.no_write:
        RESULTS.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
