"""Tensor parallelism (issue 11): SmolLM2-135M on 3 CPU ranks, what reading a site costs.

    python benchmarks/sharding.py [--shards 3] [--pairs 30] [--tokens 32] [--no-write]

Method. `LanguageModel("smollm2-135m", shards=3)`: three rank processes (gloo on loopback,
one torch thread each), the model split by transformers' own tensor-parallel plan. Every
trace goes to the group the way a local sharded trace does (wire bytes to rank 0, which
hands them to the others; a result file back). Three traces on one prompt of `--tokens`
tokens, run in rotating order `--pairs` times:

- `forward`: saves the last position's logits only (the sharded forward, plus the round trip);
- `inner`: the same, plus `layers[15].mlp.down_proj.input[:, -1].sum()`: a colwise-sharded
  activation, so the graph's view of it costs one all-gather over the ranks;
- `block`: the same, plus `layers[15].output[:, -1].sum()`: a whole site (no collective).

Each extra cost is the median of per-round differences (trace - forward) with a bootstrap
95% CI; the target is inner - forward <= 10% of forward, and block - forward within noise.
The unsharded model's forward (same prompt, 3 threads, in this process) is shown for
scale, and the sharded logits are checked against it (max |difference|).
Results: benchmarks/results/sharding.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _stats as stats  # noqa: E402

os.environ.setdefault("NNGLASS_CACHE", str(HERE.parent / ".nnglass-cache"))
import nnglass  # noqa: E402

RESULTS = HERE / "results" / "sharding.json"


def traces(lm: Any, prompt: str) -> dict[str, Any]:
    def forward() -> Any:
        with lm.trace(prompt):
            out = lm.output.logits[:, -1].save()
        return out

    def inner() -> Any:
        with lm.trace(prompt):
            lm.model.layers[15].mlp.down_proj.input[:, -1].sum().save()
            out = lm.output.logits[:, -1].save()
        return out

    def block() -> Any:
        with lm.trace(prompt):
            lm.model.layers[15].output[:, -1].sum().save()
            out = lm.output.logits[:, -1].save()
        return out

    return {"forward": forward, "inner": inner, "block": block}


def timed(fn: Any) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_avg = os.getloadavg()[0]
    began = time.perf_counter()
    sharded = nnglass.LanguageModel("smollm2-135m", shards=args.shards)
    alone = nnglass.LanguageModel("smollm2-135m")
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 8
    ids = alone.tokenizer(words).input_ids[: args.tokens]
    prompt = alone.tokenizer.decode(ids)
    runs = traces(sharded, prompt)
    check = runs["forward"]().value  # also starts the group
    start_s = time.perf_counter() - began
    torch.set_num_threads(args.shards)
    reference = traces(alone, prompt)
    diff = float((check - reference["forward"]().value).abs().max())
    for fn in runs.values():  # warm
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for k in range(args.pairs):
        for name in names[k % 3:] + names[: k % 3]:
            times[name].append(timed(runs[name]))
    plain = [timed(reference["forward"]) for _ in range(args.pairs)]
    base = np.asarray(times["forward"])
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": load_avg, "torch": torch.__version__, "cores": os.cpu_count(),
        "shards": args.shards, "pairs": args.pairs, "tokens": len(ids),
        "group_start_s": start_s, "logits_max_abs_diff": diff,
        "forward_ms": float(np.median(base)), "unsharded_forward_ms": float(np.median(plain)),
    }
    print(f"SmolLM2-135M, {args.shards} CPU ranks, {len(ids)} tokens, {args.pairs} rounds "
          f"(load average {load_avg:.2f}); group start {start_s:.1f} s; logits max |diff| {diff:.2e}")
    print(f"{'trace':<10} {'median ms':>10} {'extra ms':>10} {'95% CI':>18} {'extra / forward':>16}")
    for name in names:
        mine = np.asarray(times[name])
        extra = mine - base
        lo, hi = stats.bootstrap_ci(extra)
        med = float(np.median(extra))
        result[name] = {"median_ms": float(np.median(mine)), "extra_ms": med, "extra_ci95": [lo, hi],
                        "extra_ratio": med / float(np.median(base)), "all_ms": times[name]}
        print(f"{name:<10} {np.median(mine):>10.2f} {med:>10.2f} {f'[{lo:.2f}, {hi:.2f}]':>18} "
              f"{med / np.median(base):>15.1%}")
    print(f"unsharded forward (this process, {args.shards} threads): {np.median(plain):.2f} ms")
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
