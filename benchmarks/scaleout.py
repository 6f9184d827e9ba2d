"""Scale-out on Ray: jobs/s of two replicas vs one, and the latency a Ray worker adds.

    python benchmarks/scaleout.py [--jobs 24] [--rounds 3] [--size 1000] [--products 4]
                                  [--runs 60] [--no-write]

Method. The tests' cluster (tests/ray_cluster.py: two `ray start` nodes on 127.0.0.2 and
127.0.0.3, token auth on, 6 logical CPUs each) and the tests' tiny random Llama. One
`nnglass serve --config` with `engine = "ray"` serves the same weights as model `one`
(`replicas = 1`) and as model `two` (`replicas = 2`, `num_cpus = 4` each: one replica a node);
`share_jobs = 1`, so no job shares a pass and a replica runs one job at a time. A second
server serves it as `tiny` with the embedded default (subprocess workers). All have
`threads = 1`.

1. Throughput. In each of `--rounds` rounds, for `one` then `two`: `--jobs` jobs are
   submitted at once (one key, from one client), each a forward pass plus a chain of
   `--products` products of a `--size`² matrix (one thread: tens of ms of work in the
   worker, so the replicas, not the API process, are what the jobs wait for). jobs/s =
   jobs / (last finished_at - first created_at), the server's own timestamps. The ratio is
   taken per round (two ÷ one, the same minutes), and the median reported.
2. Latency. `--runs` rounds, the order rotating, of one one-save trace
   (`lm.model.layers[0].output.save()`) run locally, with `remote=True` on the Ray server's
   `one`, and with `remote=True` on the embedded server's `tiny`; remote - local per round
   (p50, p95). Remote values are checked bitwise against the local ones.

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
from nnglass import LanguageModel  # noqa: E402
from nnglass.graph import wire  # noqa: E402
from nnglass.graph.ir import Graph  # noqa: E402
from nnglass.server.auth import KeyStore  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402

RESULTS = HERE / "results" / "scaleout.json"
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
PROMPT = "hello world"


def server_toml(port: int, home: Path, model: Path, ray: str) -> str:
    def block(name: str, replicas: int, cpus: int) -> str:
        resources = f"resources = {{num_cpus = {cpus}}}\n" if ray else ""
        head = f'[[models]]\nname = "{name}"\nsource = "{model}"\nthreads = 1\nshare_jobs = 1\n'
        return f"{head}replicas = {replicas}\n{resources}[models.policy.limits]\nrun_seconds = 120\n\n"

    models = block("one", 1, 2) + block("two", 2, 4) if ray else block("tiny", 1, 1)
    return (f'[server]\nhost = "127.0.0.1"\nport = {port}\nhome = "{home}"\nmax_queued_per_key = 1000\n'
            f"{ray}\n{models}")


class Served:
    """`nnglass serve --config` in a subprocess, with one key."""

    def __init__(self, root: Path, name: str, model: Path, ray: str = "", env: dict[str, str] | None = None):
        self.home = root / name
        self.home.mkdir()
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        (self.home / "server.toml").write_text(server_toml(port, self.home, model, ray))
        self.key = KeyStore(self.home / "nnglass.db").create("bench")[1]
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
    return {
        "local_ms": stats(ms["local"]),
        "ray_minus_local_ms": stats([r - lo for r, lo in zip(ms["ray"], ms["local"])]),
        "embedded_minus_local_ms": stats([r - lo for r, lo in zip(ms["embedded"], ms["local"])]),
        "check": "exact" if exact else "MISMATCH",
    }


def render(res: dict[str, Any]) -> str:
    t, lat = res["throughput"], res["latency"]
    lines = ["| replicas | jobs/s (median of rounds) | per round |", "|---|---|---|"]
    for model, count in (("one", 1), ("two", 2)):
        rounds = ", ".join(f"{x:.2f}" for x in t[model])
        lines.append(f"| {count} | {np.median(t[model]):.2f} | {rounds} |")
    ratio = res["ratio_median"]
    rounds = ", ".join(f"{r:.2f}" for r in t["ratios"])
    verdict = "met" if ratio >= 1.8 else "not met"
    lines += ["", f"two ÷ one, median of per-round ratios: **{ratio:.2f}x** (target ≥ 1.8x: {verdict}); "
              f"rounds: {rounds}", "", "| remote - local, one-save trace | p50 ms | p95 ms |",
              "|---|---|---|"]
    for kind, label in (("embedded_minus_local_ms", "embedded default (subprocess worker)"),
                        ("ray_minus_local_ms", "Ray worker (actor on the cluster)")):
        lines.append(f"| {label} | {lat[kind]['p50']:.1f} | {lat[kind]['p95']:.1f} |")
    ray50, emb50 = lat["ray_minus_local_ms"]["p50"], lat["embedded_minus_local_ms"]["p50"]
    lines += ["", f"Ray ÷ embedded (p50): {ray50 / emb50:.2f}x; remote values vs local: {lat['check']}."]
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
    cluster = RayCluster(cpus_per_node=6)
    cluster.start()
    servers: list[Served] = []
    try:
        ray_cfg = f'engine = "ray"\nray_address = "{cluster.address}"\nray_node_ip = "127.0.0.2"'
        ray = Served(root, "ray", model, ray_cfg, env=cluster.env)
        embedded = Served(root, "embedded", model)
        servers += [ray, embedded]
        ray.wait_ready({"one": 1, "two": 2})
        embedded.wait_ready({"tiny": 1})
        lms = {name: LanguageModel(str(model), name=name) for name in ("one", "two", "tiny")}
        graphs = {name: heavy(lms[name], args.size, args.products) for name in ("one", "two")}
        jobs_per_s(ray, graphs["one"], 4)  # warm both models' replicas
        jobs_per_s(ray, graphs["two"], 8)
        t: dict[str, list[float]] = {"one": [], "two": [], "ratios": []}
        for _ in range(args.rounds):
            for name in ("one", "two"):
                t[name].append(jobs_per_s(ray, graphs[name], args.jobs))
            t["ratios"].append(t["two"][-1] / t["one"][-1])
        res = {"throughput": t, "ratio_median": float(np.median(t["ratios"])),
               "latency": latency(lms, ray, embedded, args.runs)}
    finally:
        for s in servers:
            s.stop()
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
