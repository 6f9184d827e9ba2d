"""Co-batching on the server: 32 concurrent single-prompt traces against the plain batched limit.

    python benchmarks/cobatch.py [--rounds 3] [--clients 32] [--threads 2]

Method. SmolLM2-135M (the built-in model, float32). 32 prompts of random token ids (seeded),
lengths spread evenly over 4..24 tokens ("mixed"), and 32 of 16 tokens ("same"). Each client's
job is one trace of one prompt that saves `lm.output.logits[:, -1]` (the whole forward runs).
Side by side, in rotating order, `--rounds` times:

- limit: one plain padded batched forward of the 32 prompts (transformers, left padding, the
  attention mask, position ids from the mask): prompts / its time;
- one at a time: 32 plain forwards of one prompt each;
- server, sharing off (`share_jobs = 1`), on without waiting for the submissions in flight
  when a pass is due (`share_settle_s = 0`: what the server did before server/arrivals.py),
  and on (the defaults): three real servers on loopback
  (`_service_server.py`: `nnglass serve --config`'s app), each worker with `--threads` torch
  threads. 32 client threads, one API key each, submit their job at once through raw httpx
  calls that mirror the client (POST the wire bytes, follow the SSE stream, GET and decode the
  result); throughput is 32 / (last result decoded - first POST). The graphs are recorded once
  beforehand (recording is the client's work, on its own machine; its time is measured apart).

Every server result is checked against the plain forward of its prompt alone (allclose 1e-4).
Where the time goes: per job, submit (POST until 202), queue (queued_at -> started_at), run
(started_at -> finished_at), notify (finished_at -> COMPLETED read on the stream), download
(GET + decode); per pass, the jobs in it and its seconds (`/v1/models` "batching"); per
round, the passes it took.
Prints a table, writes benchmarks/results/cobatch.json. Generation (32 concurrent generate
jobs in one continuous batch) is measured by benchmarks/cobatch_generate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from _service_server import wait_ready
from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from nnglass.server.auth import KeyStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "cobatch.json"
MODEL = "smollm2-135m"
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
TOML = """[server]
host = "127.0.0.1"
port = {port}
home = "{home}"
max_queued_per_key = 64

[[models]]
name = "{model}"
source = "{model}"
threads = {threads}
{sharing}
"""


class Server:
    """`_service_server.py` on a free port with its own home; one key per client."""

    def __init__(self, home: Path, threads: int, sharing: str, clients: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        toml = home / "server.toml"
        toml.write_text(TOML.format(port=port, home=home, model=MODEL, threads=threads, sharing=sharing))
        with KeyStore(home / "nnglass.db") as keys:
            self.keys = [keys.create(f"client{i}")[1] for i in range(clients)]
        env = {**os.environ, "NNGLASS_HOME": str(home), "NNGLASS_CACHE": str(ROOT / ".nnglass-cache")}
        with open(home / "server.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "_service_server.py"), str(toml)],
                                         stdout=log, stderr=log, env=env)
        wait_ready(self.url, self.proc, home / "server.log", 600)

    def batching(self) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {self.keys[0]}"}
        return httpx.get(f"{self.url}/v1/models", headers=auth).json()[0]["batching"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(kind: str, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0 if kind == "mixed" else 1)
    lengths = [4 + (20 * i) // (n - 1) for i in range(n)] if kind == "mixed" else [16] * n
    return [torch.randint(100, 40000, (1, t), generator=gen) for t in lengths]


def record(lm: LanguageModel, ids: torch.Tensor) -> Graph:
    tracer = lm.trace(ids)
    tracer.__enter__()
    try:
        lm.output.logits[:, -1].save()
    finally:
        tracer.__exit__(KeyError, KeyError(), None)  # leave the block without running it
    return tracer.graph


def batched(model: torch.nn.Module, batch: list[torch.Tensor], pad: int) -> torch.Tensor:
    width = max(p.shape[1] for p in batch)
    ids = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad) for p in batch])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in batch])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     use_cache=False).logits[:, -1]


def job(url: str, key: str, graph: Graph, start: threading.Barrier) -> dict[str, Any]:
    json_bytes, tensors = wire.encode(graph)
    files = {"graph": ("graph.json", json_bytes, "application/json"),
             "tensors": ("t.safetensors", tensors, "application/octet-stream")}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        start.wait()
        t0 = time.time()
        r = http.post("/v1/jobs", files=files)
        assert r.status_code == 202, r.text
        job_id, t1 = r.json()["id"], time.time()
        info: dict[str, Any] = {}
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            for line in events.iter_lines():
                if line.startswith("data:") and (info := json.loads(line[5:]))["status"] in TERMINAL:
                    break
        t2 = time.time()
        assert info["status"] == "COMPLETED", info
        saved = decode_results(http.get(f"/v1/jobs/{job_id}/result").content)
        t3 = time.time()
    return {"t0": t0, "t3": t3, "saved": saved, "submit": t1 - t0,
            "queue": info["started_at"] - info["queued_at"], "run": info["finished_at"] - info["started_at"],
            "notify": t2 - info["finished_at"],
            "download": t3 - t2}


def serve_round(server: Server, graphs: list[Graph], refs: list[torch.Tensor]) -> dict[str, Any]:
    start = threading.Barrier(len(graphs))
    out: list[Any] = [None] * len(graphs)
    passes = server.batching()["passes"]

    def client(i: int) -> None:
        out[i] = job(server.url, server.keys[i], graphs[i], start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(graphs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref, graph in zip(out, refs, graphs):
        value = next(v for n, v in got["saved"].items() if graph.nodes[n].save)
        torch.testing.assert_close(value, ref, atol=1e-4, rtol=1e-4)
    seconds = max(r["t3"] for r in out) - min(r["t0"] for r in out)
    names = ("submit", "queue", "run", "notify", "download")
    phases = {k: float(np.median([r[k] for r in out]) * 1e3) for k in names}
    return {"seconds": seconds, "phases_ms_median": phases, "passes": server.batching()["passes"] - passes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("NNGLASS_CACHE", str(ROOT / ".nnglass-cache"))
    torch.set_num_threads(args.threads)
    lm = LanguageModel(MODEL)
    model, pad = lm.module, lm.tokenizer.pad_token_id
    sets = {kind: prompts(kind, args.clients) for kind in ("mixed", "same")}
    refs = {kind: [batched(model, [p], pad)[0:1] for p in ps] for kind, ps in sets.items()}
    t = time.perf_counter()
    graphs = {kind: [record(lm, p) for p in ps] for kind, ps in sets.items()}
    record_ms = (time.perf_counter() - t) * 1e3 / (2 * args.clients)
    homes = [Path(tempfile.mkdtemp(prefix=f"cobatch-{n}-")) for n in ("off", "on", "nosettle")]
    servers = {"sharing off": Server(homes[0], args.threads, "share_jobs = 1", args.clients),
               "sharing on, no settle": Server(homes[2], args.threads, "share_settle_s = 0", args.clients),
               "sharing on": Server(homes[1], args.threads, "", args.clients)}
    rows: dict[str, dict[str, list[float]]] = {kind: {} for kind in sets}
    phases: dict[str, Any] = {}
    passes: dict[str, Any] = {}  # per round
    try:
        for kind, ps in sets.items():  # warm: every width once, on each server
            batched(model, ps, pad)
            for server in servers.values():
                serve_round(server, graphs[kind], refs[kind])
        for r in range(args.rounds):
            for kind, ps in sets.items():
                work = {
                    "limit: one padded batched forward": lambda ps=ps: batched(model, ps, pad),
                    "plain forwards one at a time": lambda ps=ps: [batched(model, [p], pad) for p in ps],
                    **{f"server, {name}": (lambda s=s, kind=kind: serve_round(s, graphs[kind], refs[kind]))
                       for name, s in servers.items()},
                }
                names = list(work)
                for name in names[r % len(names):] + names[: r % len(names)]:
                    t = time.perf_counter()
                    got = work[name]()
                    took = got["seconds"] if isinstance(got, dict) else time.perf_counter() - t
                    rows[kind].setdefault(name, []).append(len(ps) / took)
                    print(f"round {r} {kind} {name}: {len(ps) / took:.2f} prompts/s", file=sys.stderr,
                          flush=True)
                    if isinstance(got, dict):
                        phases.setdefault(kind, {}).setdefault(name, []).append(got["phases_ms_median"])
                        passes.setdefault(kind, {}).setdefault(name, []).append(got["passes"])
        batching = {name: s.batching() for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    result = {"model": MODEL, "clients": args.clients, "threads": args.threads, "rounds": args.rounds,
              "record_ms_per_trace": record_ms, "prompts_per_s": rows, "phases_ms": phases,
              "passes_per_round": passes, "batching": batching, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(render(result))


def render(result: dict[str, Any]) -> str:
    lines = [f"| {result['clients']} prompts, prompts/s (median of {result['rounds']}) | mixed 4-24 tokens | "
             "x limit | same 16 tokens | x limit |", "|---|---:|---:|---:|---:|"]
    med = {k: {n: float(np.median(v)) for n, v in rows.items()}
           for k, rows in result["prompts_per_s"].items()}
    limit = {k: med[k]["limit: one padded batched forward"] for k in med}
    for name in med["mixed"]:
        lines.append(f"| {name} | {med['mixed'][name]:.1f} | {med['mixed'][name] / limit['mixed']:.2f} | "
                     f"{med['same'][name]:.1f} | {med['same'][name] / limit['same']:.2f} |")
    for k in med:
        on, off = med[k]["server, sharing on"], med[k]["server, sharing off"]
        lines.append(f"\n{k}: sharing on / off = {on / off:.2f}x")
    lines.append("\nrecording a trace (client side, not in the server rows): "
                 f"{result['record_ms_per_trace']:.1f} ms")
    for k, by in result["phases_ms"].items():
        for name, runs in by.items():
            ph = {p: np.median([r[p] for r in runs]) for p in runs[0]}
            each = ", ".join(f"{p} {v:.0f}" for p, v in ph.items())
            lines.append(f"{k}, {name}: per-job medians (ms) {each}")
    for k, by in result.get("passes_per_round", {}).items():
        lines.append(f"{k}: passes per round " + ", ".join(f"{name} {runs}" for name, runs in by.items()))
    lines.append("batching: " + json.dumps(result["batching"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
