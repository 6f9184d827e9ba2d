"""What the production stores cost: remote - local latency of a tiny job through the embedded
default (SQLite + a results folder) and through PostgreSQL + S3, side by side in one run.

    python benchmarks/stores.py [--runs 60] [--warmup 5]

Method. The random 2-layer Llama of ``_service_server.save_tiny`` (hidden 32, char tokenizer) is
saved to a temp dir. A PostgreSQL 15 server and moto's S3 server start on loopback exactly as the
tests start them (``tests/components.py``). Two real ``nnglass serve --config`` processes start,
one per store combination, each with one replica of the model. ``--runs`` rounds, the order
rotating, each run the same one-save trace (``lm.model.layers[0].output.save()`` on one prompt)
locally, with ``remote=True`` against the embedded server, and with ``remote=True`` against the
PostgreSQL + S3 server; remote - local is taken per round (p50, p95). The results are checked
equal to the local run. Writes ``benchmarks/results/stores.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nnglass
from _report import save_json
from _service_server import save_tiny, wait_ready
from nnglass import LanguageModel
from nnglass.server.config import load_config
from nnglass.server.stores import open_keys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from components import Postgres, S3Server, free_port  # noqa: E402  (the tests' own servers)

RESULTS = HERE / "results" / "stores.json"
PROMPT = "The truth is the"

TOML = """
[server]
host = "127.0.0.1"
port = {port}
home = "{home}"
{stores}
[[models]]
name = "tiny"
source = "{model}"
threads = 1
"""


class Frontend:
    def __init__(self, home: Path, model: Path, stores: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = home / "server.toml"
        config.write_text(TOML.format(port=self.port, home=home, model=model, stores=stores))
        keys = open_keys(load_config(config))
        self.key = keys.create("bench")[1]
        keys.close()
        log = open(home / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nnglass", "serve", "--config", str(config)],
                                     stdout=log, stderr=log)
        wait_ready(self.url, self.proc, home / "server.log", 300)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="nnglass-stores-bench-"))
    save_tiny(work / "model")
    pg, s3 = Postgres(), S3Server()
    pg.start()
    s3.start()
    os.environ.update(s3.env)
    fronts: dict[str, Frontend] = {}
    try:
        (work / "embedded").mkdir()
        (work / "production").mkdir()
        fronts["embedded"] = Frontend(work / "embedded", work / "model", "")
        production = f'database = "{pg.fresh_database()}"\nresults = "{s3.url()}"\n'
        fronts["postgresql+s3"] = Frontend(work / "production", work / "model", production)
        lm = LanguageModel(str(work / "model"), name="tiny")

        def run(front: Frontend | None) -> torch.Tensor:
            if front is not None:
                nnglass.configure(host=front.url, api_key=front.key)
            with lm.trace(PROMPT, remote=front is not None):
                h = lm.model.layers[0].output.save()
            return h.value

        kinds: dict[str, Frontend | None] = {"local": None, **fronts}
        reference = run(None)
        same = all(torch.equal(run(f), reference) for f in fronts.values())
        for _ in range(args.warmup):
            for f in kinds.values():
                run(f)
        ms: dict[str, list[float]] = {k: [] for k in kinds}
        names = list(kinds)
        for i in range(args.runs):
            for kind in names[i % 3 :] + names[: i % 3]:
                t = time.perf_counter()
                run(kinds[kind])
                ms[kind].append((time.perf_counter() - t) * 1e3)
        res: dict[str, Any] = {"check": "exact" if same else "MISMATCH", "local_ms": stats(ms["local"])}
        for kind in fronts:
            extra = [r - lo for r, lo in zip(ms[kind], ms["local"])]
            res[kind] = {"remote_ms": stats(ms[kind]), "remote_minus_local_ms": stats(extra)}
        base, prod = (res[k]["remote_minus_local_ms"]["p50"] for k in fronts)
        res["ratio_p50"] = prod / base
    finally:
        for f in fronts.values():
            f.stop()
        pg.stop()
        s3.stop()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
           "runs": args.runs, "warmup": args.warmup, "threads": 1}
    save_json(RESULTS, env, res)
    local = res["local_ms"]["p50"]
    print(f"{'stores':<16} {'remote-local p50':>17} {'p95':>8}   (ms; local p50 {local:.1f})")
    for kind in fronts:
        d = res[kind]["remote_minus_local_ms"]
        print(f"{kind:<16} {d['p50']:>17.1f} {d['p95']:>8.1f}")
    print(f"ratio p50 (postgresql+s3 / embedded): {res['ratio_p50']:.2f}   results: {res['check']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
