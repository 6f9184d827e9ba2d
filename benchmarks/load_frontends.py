"""Load across two frontends (issue 10's target): 200 clients x 10 jobs against two
`nnglass serve` processes on one PostgreSQL database and one S3 bucket.

    python benchmarks/load_frontends.py                  # 200 clients x 10 jobs
    python benchmarks/load_frontends.py --clients 20 --jobs 5

PostgreSQL 15 and moto's S3 server start on loopback as the tests start them
(tests/components.py); the two frontends share them, each with its own worker subprocess
for the tiny random Llama (`share_jobs = 8`). Each client is a thread with its own API key.
Its jobs are those of benchmarks/load.py (traces, generations, sessions, errors, cancels;
a prompt unique to the client and job, the expected values computed locally before it
submits). Job k of client i is submitted to frontend (i + k) % 2 and then watched (its
event stream), cancelled and downloaded through the *other* one, so every answer crosses
frontends: the same loop as load.py's clients (`load.one_job`), two clients in place of one.

Checks: 0 lost (every accepted job ends and is listed under its key, on both frontends),
0 wrong (values as the local run; an error at its line; a cancel CANCELLED or COMPLETED),
0 delivered to the wrong key (the values are this client's own; another client's key gets
404 for this client's job on both frontends), 0 stuck. Also reported: which frontend ran
how many jobs (each frontend's `/metrics`: jobs it finished, jobs that shared a pass),
p50/p99 submit-to-end latency, jobs/s. Prints a table, writes JSON (`--out`); exits
nonzero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import load  # noqa: E402  (benchmarks/load.py: the jobs and their checks)
from _service_server import save_tiny  # noqa: E402
from components import Postgres, S3Server, free_port  # noqa: E402  (the tests' own servers)
from nnglass import LanguageModel  # noqa: E402
from nnglass.server.config import load_config  # noqa: E402
from nnglass.server.stores import open_keys  # noqa: E402

TOML = """[server]
host = "127.0.0.1"
port = {port}
home = "{home}"
database = "{database}"
results = "{results}"
max_queued_per_key = 64

[[models]]
name = "tiny"
source = "{model}"
threads = 1
share_jobs = 8

[models.policy.limits]
run_seconds = 60
new_tokens = 8
"""


def client(urls: list[str], key: str, planned: list[load.Planned], index: int, tally: load.Tally,
           timeout: float, done: dict[int, list[str]]) -> None:
    """One client: job k (recorded and run locally before the load, load.plan) submitted to
    frontend (index + k) % 2, watched through the other (load.one_job); `done[index]`: its
    job ids, once it has checked them all."""
    auth = {"Authorization": f"Bearer {key}"}
    https = [httpx.Client(base_url=u, headers=auth, timeout=60) for u in urls]
    try:
        mine = [job for k, p in enumerate(planned)
                if (job := load.one_job(https[(index + k) % 2], https[(index + k + 1) % 2], p, f"{index}/{k}",
                                        tally, timeout))]
        for http in https:
            load.check_listed(http, mine, tally)
        done[index] = mine
    finally:
        for http in https:
            http.close()


def cross_key_probe(urls: list[str], keys: list[str], jobs: dict[int, list[str]]) -> list[str]:
    """Each client's first and last job, asked for with the next client's key on both
    frontends: anything but 404 is a job (or result) delivered to the wrong key."""
    leaks = []
    for i, mine in jobs.items():
        other = keys[(i + 1) % len(keys)]
        for url in urls:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {other}"}, timeout=30) as http:
                for job in {mine[0], mine[-1]} if mine else set():
                    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/result"):
                        if (code := http.get(path).status_code) != 404:
                            leaks.append(f"{url}{path} answered {code} to another key")
    return leaks


def metric(url: str, key: str, name: str) -> float:
    """The sum of `name`'s lines (every label) in the frontend's /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.rpartition(" ")[0].split("{")[0] == name)


def drive(urls: list[str], keys: list[str], lm: LanguageModel, jobs: int, timeout: float) -> dict[str, Any]:
    """`len(keys)` clients x `jobs` jobs against frontends `urls` (two); the findings."""
    tally, mine = load.Tally(), {}  # mine: client index -> its job ids
    before = {u: metric(u, keys[0], "nnglass_jobs_finished_total") for u in urls}
    plans = [load.plan(lm, i, jobs) for i in range(len(keys))]  # before the clock starts
    threads = [threading.Thread(target=client, args=(urls, key, plans[i], i, tally, timeout, mine),
                                daemon=True)
               for i, key in enumerate(keys)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 600)
    wall = time.monotonic() - start
    lost = tally.lost + [f"client {i} never finished" for i in range(len(keys)) if i not in mine]
    lat = sorted(tally.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    ran = {u: metric(u, keys[0], "nnglass_jobs_finished_total") - before[u] for u in urls}
    return {"clients": len(keys), "jobs_per_client": jobs, "jobs": len(keys) * jobs, "ended": len(lat),
            "lost": lost, "wrong": tally.wrong, "wrong_key": cross_key_probe(urls, keys, mine),
            "stuck": tally.stuck, "p50_s": pct(0.50), "p99_s": pct(0.99), "wall_s": wall,
            "jobs_per_s": len(lat) / wall, "finished_by_frontend": list(ran.values()),
            "shared_by_frontend": [metric(u, keys[0], "nnglass_shared_jobs_total") for u in urls],
            "outcomes": dict(sorted(tally.by_kind.items()))}


class Frontend:
    """`nnglass serve --config` on the shared stores."""

    def __init__(self, root: Path, name: str, model: Path, database: str, results: str) -> None:
        self.home = root / name
        self.home.mkdir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.config = self.home / "server.toml"
        self.config.write_text(TOML.format(port=port, home=self.home, model=model, database=database,
                                           results=results))
        log = open(self.home / "server.log", "ab")
        command = [sys.executable, "-m", "nnglass", "serve", "--config", str(self.config)]
        env = {**os.environ, "NNGLASS_HOME": str(self.home)}
        self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json()["models"].get("tiny") == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("frontend not ready:\n" + (self.home / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def table(r: dict[str, Any]) -> str:
    ran = " / ".join(f"{x:.0f}" for x in r["finished_by_frontend"])
    shared = " / ".join(f"{x:.0f}" for x in r["shared_by_frontend"])
    return "\n".join([
        "| clients x jobs | ended | lost | wrong | wrong key | stuck | p50 s | p99 s | jobs/s | "
        "ran on A / B | shared a pass on A / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['clients']} x {r['jobs_per_client']} | {r['ended']} | {len(r['lost'])} | {len(r['wrong'])} | "
        f"{len(r['wrong_key'])} | {len(r['stuck'])} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
        f"{r['jobs_per_s']:.1f} | {ran} | {shared} |"])


def failed(r: dict[str, Any]) -> bool:
    return bool(r["lost"] or r["wrong"] or r["wrong_key"] or r["stuck"] or r["ended"] < r["jobs"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a job counts as stuck")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "load_frontends.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    postgres, s3 = Postgres(), S3Server()
    postgres.start()
    s3.start()
    os.environ.update(s3.env)  # the frontends (and the key store here) reach S3 with these
    frontends: list[Frontend] = []
    try:
        with tempfile.TemporaryDirectory(prefix="nnglass-load-frontends-") as tmp:
            root = Path(tmp)
            save_tiny(root / "tiny")
            database, results = postgres.fresh_database(), s3.url()
            frontends = [Frontend(root, name, root / "tiny", database, results) for name in ("a", "b")]
            for f in frontends:
                f.wait_ready()
            keys_store = open_keys(load_config(frontends[0].config))
            keys = [keys_store.create(f"client{i}")[1] for i in range(args.clients)]
            keys_store.close()
            lm = LanguageModel(str(root / "tiny"), name="tiny")
            row = drive([f.url for f in frontends], keys, lm, args.jobs, args.timeout)
            load_avg = os.getloadavg()[0]
    finally:
        for f in frontends:
            f.stop()
        s3.stop()
        postgres.stop()
    row["env"] = {"cores": os.cpu_count(), "load_average_at_end": load_avg, "torch": torch.__version__}
    print(table(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    for what in ("lost", "wrong", "wrong_key", "stuck"):
        for line in row[what][:5]:
            print(f"{what}: {line}", file=sys.stderr)
    return 1 if failed(row) else 0


if __name__ == "__main__":
    sys.exit(main())
