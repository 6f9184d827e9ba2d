"""The steering extension's cost: a 32-token chat completion with one steering vector vs the
same request without it, side by side, with 95% confidence intervals.

    NNGLASS_CACHE=.nnglass-cache python benchmarks/openai_api.py [--rounds 30] [--tokens 32]
        [--model smollm2-135m] [--site model.layers.12] [--threads 2] [--warmup 2]
        [--worker-rounds 0] [--no-write]

Two measurements, each of `plain` and `steered` requests in pairs, alternating which runs
first (drift both sides of a pair share cancels); ratio = steered / plain per pair,
reported as the median with a bootstrap 95% CI over pairs (benchmarks/_stats.py). A pair
whose two answers have different token counts (an end-of-sequence token came first on one
side) is counted in `uneven_pairs`: its ratio prices different work.

- Through the service (`--rounds` pairs): `nnglass serve --config` in a subprocess on a free
  loopback port, its own temporary NNGLASS_HOME, serving the model (float32, `--threads`
  torch threads); the official `openai` client; greedy chat completions (temperature 0) of
  `--tokens` tokens, one short user message, timed on the client from the call to the
  parsed answer. Each round also streams the steered request (`stream=True`): time to the
  first token chunk and to the end.
- In the worker's own code (`--worker-rounds` pairs, 0: skipped), no HTTP, no queue: the
  request's graph as the OpenAI frontend builds it (`Frontend.build`, timed: the steer's
  graph-building cost), decoded by the wire codec, run by `LanguageModel.run_graph` under
  the limits a served job runs with, with the per-step hook the worker installs (so this
  prices the graph's per-step nodes and the step lines' encoding, not the transport); and
  one step line alone (a token, nothing saved), averaged over 2000.

The steered request adds `extra_body={"nnglass": {"steer": [{"site", "vector" (a seeded random
unit vector), "scale": 4, "positions": "all"}]}}`. Writes benchmarks/results/openai_api.json
unless --no-write (`--rounds 0` measures only in the worker, and keeps the file's service part).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import torch

from _service_server import wait_ready
from _stats import bootstrap_ci
from nnglass.server.auth import KeyStore

HERE = Path(__file__).resolve().parent
TOML = """[server]
host = "127.0.0.1"
port = {port}
home = "{home}"

[[models]]
name = "bench"
source = "{model}"
threads = {threads}

[models.policy.limits]
new_tokens = 256
run_seconds = 900
"""
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def start(home: Path, model: str, threads: int) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "server.toml").write_text(TOML.format(port=port, home=home, model=model, threads=threads))
    with KeyStore(home / "nnglass.db") as keys:
        _, key = keys.create("bench")
    log = open(home / "server.log", "ab")
    command = [sys.executable, "-m", "nnglass", "serve", "--config", str(home / "server.toml")]
    proc = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "NNGLASS_HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, home / "server.log", 600)
    return proc, url, key


def ratio_summary(plain: list[float], steered: list[float]) -> dict[str, Any]:
    ratios = np.asarray(steered) / np.asarray(plain)
    return {"pairs": len(ratios), "plain_p50_s": float(np.median(plain)),
            "steered_p50_s": float(np.median(steered)), "ratio": float(np.median(ratios)),
            "ratio_ci95": list(bootstrap_ci(ratios))}


def pairs(rounds: int, warmup: int, one: Any) -> tuple[list[Any], list[Any]]:
    """`rounds` (plain, steered) results in alternating order, after `warmup` pairs."""
    for _ in range(warmup):
        one(False), one(True)
    plain, steered = [], []
    for i in range(rounds):
        got = {s: one(s) for s in ((False, True) if i % 2 == 0 else (True, False))}
        plain.append(got[False])
        steered.append(got[True])
        print(f"pair {i + 1}/{rounds}: plain {got[False]}, steered {got[True]}", file=sys.stderr, flush=True)
    return plain, steered


def through_service(args: argparse.Namespace, steer: dict[str, Any]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="nnglass-openai-bench-"))
    proc, url, key = start(home, args.model, args.threads)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=900)
        kw = {"model": "bench", "max_tokens": args.tokens, "temperature": 0, "messages": MESSAGES}
        streams: list[dict[str, float]] = []

        def one(steered: bool) -> tuple[float, int]:
            extra = {"extra_body": {"nnglass": {"steer": [steer]}}} if steered else {}
            t = time.perf_counter()
            r = client.chat.completions.create(**kw, **extra)  # type: ignore[call-overload]
            took = time.perf_counter() - t
            if steered:  # and the same, streamed: when its first token and its end arrive
                t, first = time.perf_counter(), None
                for c in client.chat.completions.create(**kw, **extra, stream=True):  # type: ignore[call-overload]
                    if first is None and c.choices and c.choices[0].delta.content:
                        first = time.perf_counter() - t
                streams.append({"first_token_s": first or float("nan"), "end_s": time.perf_counter() - t})
            return took, r.usage.completion_tokens

        plain, steered = pairs(args.rounds, args.warmup, one)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    streams = streams[-args.rounds:]
    return {**ratio_summary([p[0] for p in plain], [s[0] for s in steered]),
            "tokens": [plain[0][1], steered[0][1]],
            "uneven_pairs": sum(p[1] != s[1] for p, s in zip(plain, steered)),
            "stream_first_token_p50_s": float(np.median([s["first_token_s"] for s in streams])),
            "stream_end_p50_s": float(np.median([s["end_s"] for s in streams])),
            "rounds": [{"plain_s": p[0], "steered_s": s[0], "tokens": [p[1], s[1]], **streamed}
                       for p, s, streamed in zip(plain, steered, streams)]}


def in_worker(args: argparse.Namespace, steer: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    from nnglass.graph import wire
    from nnglass.graph.ops import REGISTRY
    from nnglass.models.language import LanguageModel
    from nnglass.server.config import Limits
    from nnglass.server.openai_graph import Frontend
    from nnglass.server.openai_request import parse_request
    from nnglass.server.steps import step_sender
    from nnglass.server.worker import _limits

    torch.set_num_threads(args.threads)
    frontend = Frontend("bench", args.model)
    lm = LanguageModel(args.model, name="bench")
    limits = _limits({"limits": asdict(Limits(new_tokens=256, run_seconds=900))})
    body = {"model": "bench", "max_tokens": args.tokens, "temperature": 0, "messages": MESSAGES}
    builds: dict[bool, list[float]] = {False: [], True: []}

    def one(steered: bool) -> float:
        req = parse_request({**body, **({"nnglass": {"steer": [steer]}} if steered else {})}, chat=True)
        t = time.perf_counter()
        graph_json, tensors, _ = frontend.build(req, frontend.prompt_ids(req), args.tokens)
        builds[steered].append(time.perf_counter() - t)
        graph = wire.decode(graph_json, tensors, registry=REGISTRY)
        t = time.perf_counter()
        with torch.no_grad():
            lm.run_graph(graph, limits=limits, on_step=step_sender("bench", lambda m: json.dumps(m), 2**62))
        return time.perf_counter() - t

    plain, steered = pairs(args.worker_rounds, args.warmup, one)
    hook = step_sender("bench", lambda m: json.dumps(m), 2**62)  # one step line: a token, nothing saved
    t = time.perf_counter()
    for k in range(2000):
        hook(k, torch.tensor([[k]]), {})
    return {**ratio_summary(plain, steered), "step_line_us": (time.perf_counter() - t) / 2000 * 1e6,
            "build_p50_ms": {"plain": 1e3 * float(np.median(builds[False])),
                             "steered": 1e3 * float(np.median(builds[True]))}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="pairs through the service (0: skip)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", default="model.layers.12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="pairs before the timed ones")
    ap.add_argument("--worker-rounds", type=int, default=0, help="pairs in the worker's code (0: skip)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from nnglass.models import loading

    config, _ = loading.load_config_and_tokenizer(loading.resolve_model_source(args.model))
    v = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(0))
    steer = {"site": args.site, "vector": (v / v.norm()).tolist(), "scale": 4.0, "positions": "all"}
    result: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "site": args.site,
                              "threads": args.threads, "load_average": os.getloadavg()[0]}
    print("| measured | pairs | plain p50 s | steered p50 s | ratio (median of pairs) | 95% CI |")
    print("|---|---:|---:|---:|---:|---|")
    parts = {"service": through_service} if args.rounds else {}
    if args.worker_rounds:
        parts["worker"] = in_worker
    for name, measure in parts.items():
        r = result[name] = measure(args, steer)
        lo, hi = r["ratio_ci95"]
        print(f"| {name} | {r['pairs']} | {r['plain_p50_s']:.3f} | {r['steered_p50_s']:.3f} | "
              f"{r['ratio']:.3f} | {lo:.3f} to {hi:.3f} |")
    if "service" in result:
        s = result["service"]
        print(f"\nstreamed steered: first token p50 {s['stream_first_token_p50_s']:.3f} s, "
              f"end p50 {s['stream_end_p50_s']:.3f} s; tokens (plain, steered) {s['tokens']}, "
              f"pairs of uneven tokens {s['uneven_pairs']}")
    if "worker" in result:
        w = result["worker"]
        print(f"graph build p50 (ms): {w['build_p50_ms']}; one step line: {w['step_line_us']:.1f} us")
    if not args.no_write:  # a run of one part keeps the other part's last numbers
        out = HERE / "results" / "openai_api.json"
        out.parent.mkdir(exist_ok=True)
        kept = json.loads(out.read_text()) if out.exists() else {}
        kept = {k: v for k, v in kept.items() if k in ("service", "worker") and k not in result}
        out.write_text(json.dumps({**result, **kept}, indent=2))


if __name__ == "__main__":
    main()
