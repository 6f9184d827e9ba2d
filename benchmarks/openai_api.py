"""The steering extension's cost: a 32-token chat completion with one steering vector vs the
same request without it, through the official `openai` client against a real server.

    NNGLASS_CACHE=.nnglass-cache python benchmarks/openai_api.py [--rounds 12] [--tokens 32]
        [--model smollm2-135m] [--site model.layers.12] [--threads 2] [--no-write]

Method. `nnglass serve --config` in a subprocess on a free loopback port, its own temporary
NNGLASS_HOME, serving the model (default: the built-in SmolLM2-135M, float32, `threads`
torch threads); a key made with KeyStore. Greedy chat completions (temperature 0) of
`--tokens` tokens, one short user message. After `--warmup` pairs, `--rounds` pairs run in
alternating order (plain first in even rounds, steered first in odd ones); each request is
timed on the client from the call to the parsed answer. The steered request adds
`extra_body={"nnglass": {"steer": [{"site", "vector" (a seeded random unit vector), "scale": 4,
"positions": "all"}]}}`. Ratio = steered / plain per pair; reported: the median ratio, p50 of
each latency, and the completion tokens (a pair whose lengths differ is reported per token
too). Writes benchmarks/results/openai_api.json unless --no-write.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from _service_server import wait_ready
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", default="model.layers.12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="pairs before the timed ones")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="nnglass-openai-bench-"))
    proc, url, key = start(home, args.model, args.threads)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        auth = {"Authorization": f"Bearer {key}"}
        meta = httpx.get(f"{url}/v1/models/bench/meta", headers=auth, timeout=300).json()
        width = json.loads(base64.b64decode(meta["files"]["config.json"]))["hidden_size"]
        v = torch.randn(width, generator=torch.Generator().manual_seed(0))
        v = v / v.norm()
        steer = {"site": args.site, "vector": v.tolist(), "scale": 4.0, "positions": "all"}
        kw = {"model": "bench", "max_tokens": args.tokens, "temperature": 0,
              "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}

        def one(steered: bool) -> tuple[float, int]:
            extra = {"extra_body": {"nnglass": {"steer": [steer]}}} if steered else {}
            t = time.perf_counter()
            r = client.chat.completions.create(**kw, **extra)  # type: ignore[call-overload]
            return time.perf_counter() - t, r.usage.completion_tokens

        for _ in range(args.warmup):
            one(False), one(True)
        rows = []
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {s: one(s) for s in order}
            rows.append({"plain_s": got[False][0], "steered_s": got[True][0],
                         "plain_tokens": got[False][1], "steered_tokens": got[True][1]})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ratio = statistics.median(r["steered_s"] / r["plain_s"] for r in rows)
    per_token = statistics.median((r["steered_s"] / r["steered_tokens"]) / (r["plain_s"] / r["plain_tokens"])
                                  for r in rows)
    result = {"model": args.model, "tokens": args.tokens, "site": args.site, "threads": args.threads,
              "rounds": rows, "median_ratio": ratio, "median_ratio_per_token": per_token,
              "plain_p50_s": statistics.median(r["plain_s"] for r in rows),
              "steered_p50_s": statistics.median(r["steered_s"] for r in rows)}
    print("| model | tokens (plain / steered) | plain p50 s | steered p50 s | ratio | per token |")
    print("|---|---|---:|---:|---:|---:|")
    tokens = f"{rows[0]['plain_tokens']} / {rows[0]['steered_tokens']}"
    print(f"| {args.model} | {tokens} | {result['plain_p50_s']:.3f} | {result['steered_p50_s']:.3f} | "
          f"{ratio:.3f} | {per_token:.3f} |")
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "openai_api.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
