"""Co-batching of generation on the server: 32 concurrent generate jobs in one continuous batch.

    python benchmarks/cobatch_generate.py            # the issue's size (a quiet machine: ~6 min)
    python benchmarks/cobatch_generate.py --join-tokens 100000 --join-wait-s 0   # as before the
                                                     # join budget and window, to compare
    python benchmarks/cobatch_generate.py --clients 8 --new 8 --alone 2 --probes 10 --threads 1 \
        --out /tmp/cobatch_generate.small.json       # small, for direction while developing
    python benchmarks/cobatch_generate.py --rounds 0 --alone 1 --out /tmp/x.json
                                                     # the server rows only (the small job's
                                                     # latency, the server's tokens/s)

The defaults are the full size: 32 jobs, 32 new tokens each, 2 torch threads, 8 of the
jobs run alone (scaled), up to 40 small-job probes each way, 3 rounds of the in-process rows.

Method. SmolLM2-135M (float32), the 32 mixed prompts of benchmarks/cobatch.py (4..24 tokens).
Each job generates exactly `--new` tokens (greedy; min_new_tokens = max_new_tokens, so EOS
never ends one early) with its own steering vector added to layer 3's output at every step.
Side by side in one run (the in-process rows `--rounds` times in turn, each row's
median; its CPU seconds too, which a busy machine inflates far less than wall time):

- plain padded `generate` of the 32 prompts (transformers, no interventions);
- transformers' `generate_batch` (continuous batching, paged cache; no interventions);
- the nnglass continuous batch in this process (runtime/decode_batch.py, the 32 jobs), all
  joining in one prompt forward (as plain `generate` prefills its batch), and again with the
  prompts joining at most the server's `join_tokens` padded tokens a step (as the server
  admits them: all at once while no row runs, then at most that many tokens a step);
- the same jobs one at a time (the lone path, `lm.run_graph`): `--alone` of them, scaled;
- the server (`_service_server.py`, defaults): 32 clients submit at once; new tokens /
  (last result decoded - first POST), `--rounds` times (median), each round followed by a
  plain `generate` (its ratio to that run, same minute, is printed too). Every server
  result is checked against the lone run.
- latency of a small job (one trace of 8 tokens, one save) on the idle server, and
  submitted while the 32 generations run again (a second round after the throughput one,
  so that the probes' own work on the worker is not in the throughput row): p50 and p95 of
  up to `--probes` each, one after another, each after a random pause of up to
  `--probe-gap` s (seeded), so that it arrives at a random moment of the step that runs
  then (right after the previous answer it would always come just after a step boundary,
  and wait for nearly a whole step); busy probes stop when the generations end, and one
  that ended after them is not counted.
- where the generate jobs' time went: the submissions' arrival (first POST to last 202),
  each job's submit, queue, run, notify and download (median, max); the server's batching
  counters (`/v1/models`: forwards, rows per forward, the joiners' prompt forwards).
Prints a table, writes `--out` (benchmarks/results/cobatch_generate.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nnglass
from cobatch import MODEL, RESULTS, ROOT, Server, job, prompts, record
from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.models.batched_generate import decode_batch, generate_job
from nnglass.server.config import ModelConfig

OUT = RESULTS.with_name("cobatch_generate.json")
LAYER = 3


def steer_graph(lm: LanguageModel, ids: torch.Tensor, new: int, i: int) -> Graph:
    vector = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(i)) * 0.05
    tracer = lm.generate(ids, max_new_tokens=new, min_new_tokens=new)
    tracer.backend = nnglass.Recorder()  # recorded, not run
    with tracer:
        with tracer.all():
            lm.model.layers[LAYER].output[:] += vector
        tracer.result.save()
    return tracer.graph


def padded(ps: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in ps)
    ids = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad) for p in ps])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in ps])
    return ids, mask


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def rounds(rows: dict[str, Any], n: int) -> dict[str, tuple[float, float]]:
    """Each row `n` times, in turn: its median (wall seconds, CPU seconds of this process)."""
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(n):
        for name, fn in rows.items():
            cpu = time.process_time()
            wall, _ = timed(fn)
            seen[name].append((wall, time.process_time() - cpu))
    return {name: (float(np.median([w for w, _ in t])), float(np.median([c for _, c in t])))
            for name, t in seen.items()}


def in_process(lm: LanguageModel, graphs: list[Graph], prefill_tokens: int | None = None) -> list[Any]:
    batch = decode_batch(lm, prefill_tokens=prefill_tokens)
    for i, g in enumerate(graphs):
        batch.add(generate_job(lm, g, i))
    out: list[Any] = [None] * len(graphs)
    while len(batch):
        for f in batch.step():
            if f.error is not None:
                raise f.error
            out[f.key] = f.saved
    return out


def latency(server: Server, graph: Graph, n: int, gap: float, seed: int,
            running: Any = None) -> list[float]:
    """Up to `n` small jobs one after another, each after a random pause of 0..`gap` s (so
    each arrives at a random moment of the step running then, as a user's job does, not
    just after a step boundary, where the previous answer left it); `running()` false:
    stop, and drop a probe that ended after it went false (it did not run under load)."""
    rng = np.random.default_rng(seed)
    times = []
    while len(times) < n and (running is None or running()):
        time.sleep(float(rng.uniform(0, gap)))
        r = job(server.url, server.keys[-1], graph, threading.Barrier(1))
        if running is None or running():
            times.append(r["t3"] - r["t0"])
    return times


def generations(server: Server, graphs: list[Graph], refs: list[Any],
                probes: Any = None) -> tuple[list[dict[str, Any]], list[float]]:
    """The generate jobs submitted at once, one client each, every result checked against
    its lone run; `probes(running)`: small jobs meanwhile, from half a second after the
    submissions (their latencies)."""
    n = len(graphs)
    start = threading.Barrier(n + 1)
    out: list[Any] = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, job(
        server.url, server.keys[i], graphs[i], start))) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    busy: list[float] = []
    if probes is not None:
        time.sleep(0.5)  # the submissions are in
        busy = probes(lambda: any(r is None for r in out))
    for t in threads:
        t.join()
    for got, ref in zip(out, refs):
        assert all(torch.equal(got["saved"][k], ref[k]) for k in ref), "server result differs"
    return out, busy


def phases(out: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the generate jobs' time went: median and max of each phase (benchmarks/cobatch.py
    `job`), and how long the 32 submissions took to arrive (first POST to last 202)."""
    names = ("submit", "queue", "run", "notify", "download")
    return {"arrivals_s": max(r["t0"] + r["submit"] for r in out) - min(r["t0"] for r in out),
            **{k: {"median": float(np.median([r[k] for r in out])), "max": float(max(r[k] for r in out))}
               for k in names}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alone", type=int, default=8)
    parser.add_argument("--probes", type=int, default=40, help="most small-job probes each way")
    parser.add_argument("--probe-gap", type=float, default=0.2,
                        help="a probe's random pause before it, at most")
    parser.add_argument("--run-seconds", type=float, default=600, help="the server's per-job time limit")
    parser.add_argument("--join-tokens", type=int, help="the server's join_tokens (default: its own)")
    parser.add_argument("--join-wait-s", type=float, help="the server's join_wait_s (default: its own)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each in-process row runs (median); 0: the server rows only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault("NNGLASS_CACHE", str(ROOT / ".nnglass-cache"))
    torch.set_num_threads(args.threads)
    lm = LanguageModel(MODEL)
    model, pad, n, new = lm.module, lm.tokenizer.pad_token_id, args.clients, args.new
    ps = prompts("mixed", n)
    graphs = [steer_graph(lm, p, new, i) for i, p in enumerate(ps)]
    ids, mask = padded(ps, pad)
    tokens = n * new
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    partial = args.out.with_suffix(".partial.json")

    def note(name: str, value: float, cpu_s: float | None = None) -> None:  # as it goes: a slow
        rates[name] = value  # machine keeps what it measured
        if cpu_s is not None:
            cpu[name] = cpu_s
        print(f"{name}: {value:.1f} tokens/s", file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"tokens_per_s": rates, "cpu_s": cpu}, indent=2))

    def plain() -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=pad)

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=pad, eos_token_id=lm.tokenizer.eos_token_id)
    lists = [p[0].tolist() for p in ps]
    # Its paged cache sized for these requests: left to itself it takes 90% of the free
    # memory, which on a shared machine gets processes killed.
    pages = sum(-(-(len(p) + new) // 256) for p in lists)  # 256 tokens a page
    paged = ContinuousBatchingConfig(num_blocks=2 * pages + 8, max_batch_tokens=sum(map(len, lists)) + n)

    def continuous() -> Any:
        with torch.no_grad():
            return model.generate_batch(inputs=lists, generation_config=config,
                                        continuous_batching_config=paged, progress_bar=False)

    shared: list[Any] = []
    budgeted: list[Any] = []
    budget = args.join_tokens if args.join_tokens is not None else ModelConfig.join_tokens
    rows = {"plain padded generate (no interventions)": plain,
            "transformers generate_batch (no interventions)": continuous,
            "nnglass continuous batch, in process (steered)": lambda: shared.__setitem__(
                slice(None), in_process(lm, graphs)),
            f"the same, prompts joining {budget} padded tokens a step (as the server)":
                lambda: budgeted.__setitem__(slice(None), in_process(lm, graphs, budget))}
    if not args.rounds:  # the server rows only: the in-process batch once, for the checks
        rows = {k: v for k, v in rows.items() if "nnglass" in k}
    for name, fn in list(rows.items()):  # warm each (first calls build caches); drop what fails
        try:
            fn()
        except Exception as e:  # recorded, not hidden
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            del rows[name]
    for name, (wall, cpu_s) in rounds(rows, args.rounds).items() if args.rounds else ():
        note(name, tokens / wall, cpu_s)
    took, alone = timed(lambda: [lm.run_graph(g) for g in graphs[: args.alone]])
    if args.rounds:
        note(f"same jobs one at a time (lone path, {args.alone} of {n})", args.alone * new / took)
    for i, a in enumerate(alone):  # each batch that ran, against the lone runs
        for batch in (b for b in (shared, budgeted) if b):
            assert all(torch.equal(a[k], batch[i][k]) for k in a), "the batch differs from the lone run"
    probe = record(lm, ps[-1][:, :8])
    home = Path(tempfile.mkdtemp(prefix="cobatch-gen-"))
    settings = "".join(f"{k} = {v}\n" for k, v in (("join_tokens", args.join_tokens),
                                                 ("join_wait_s", args.join_wait_s)) if v is not None)
    limits = f"[models.policy.limits]\nrun_seconds = {args.run_seconds:g}"
    server = Server(home, args.threads, settings + limits, n + 1)
    try:
        job(server.url, server.keys[0], graphs[0], threading.Barrier(1))  # warm
        idle = latency(server, probe, args.probes, args.probe_gap, 0)
        print(f"idle small-job latencies {np.round(idle, 3).tolist()}", file=sys.stderr, flush=True)
        # Rounds of the server row too (median; one round moves by +-0.1x on a quiet
        # machine), each next to a plain `generate` of the same minute: the ratio per round.
        served: list[float] = []
        paired: list[float] = []
        for _ in range(max(1, args.rounds)):
            out, _ = generations(server, graphs, shared)
            served.append(tokens / (max(r["t3"] for r in out) - min(r["t0"] for r in out)))
            if args.rounds:
                paired.append(served[-1] / (tokens / timed(plain)[0]))
        note(f"server, {n} concurrent steered generate jobs", float(np.median(served)))
        _, busy = generations(server, graphs, shared, lambda running: latency(
            server, probe, args.probes, args.probe_gap, 1, running))
        print(f"busy small-job latencies {np.round(busy, 3).tolist()}", file=sys.stderr, flush=True)
        batching = server.batching()
    finally:
        server.stop()
    result = {"model": MODEL, "clients": n, "new_tokens": new, "threads": args.threads,
              "rounds": args.rounds, "tokens_per_s": rates, "cpu_s_in_process": cpu,
              "small_job_s": {"idle_p95": float(np.percentile(idle, 95)),
                              "busy_p95": float(np.percentile(busy, 95)),
                              "idle_p50": float(np.median(idle)), "busy_p50": float(np.median(busy)),
                              "idle": idle, "busy": busy},
              "server_rounds_tokens_per_s": served, "server_over_plain_same_minute": paired,
              "generate_jobs": phases(out), "batching": batching, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.write_text(json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    best = max((v for k, v in rates.items() if "no interventions" in k), default=float("nan"))
    lines = ["| generation, new tokens/s | tokens/s | x best plain | CPU s (in process) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / best:.2f} | {cpu[k]:.2f} |" if k in cpu else
              f"| {k} | {v:.1f} | {v / best:.2f} | |" for k, v in rates.items()]
    s = result["small_job_s"]
    lines.append(f"\nsmall job p95: idle {s['idle_p95']:.3f} s, during the generations "
                 f"{s['busy_p95']:.3f} s ({s['busy_p95'] / s['idle_p95']:.2f}x); p50 {s['idle_p50']:.3f} s, "
                 f"{s['busy_p50']:.3f} s ({s['busy_p50'] / s['idle_p50']:.2f}x); "
                 f"{len(idle)} and {len(busy)} probes")
    lines.append(f"server rounds, tokens/s: {[round(v, 1) for v in served]}; each / the plain generate "
                 f"run right after it: {[round(v, 2) for v in paired]}")
    lines.append("generate jobs (s): " + json.dumps(result["generate_jobs"]))
    lines.append("batching: " + json.dumps(batching))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
