"""Overhead of tracing: plain PyTorch vs hand-registered hooks vs nnsight 0.8.1 vs nnglass.

    python benchmarks/overhead.py [--pairs 300] [--only mlp|gpt2] [--frameworks a,b]
                                  [--cold-runs 3] [--no-write]
    (or `make bench`; nnsight's venv comes from benchmarks/setup_nnsight.sh, run here if missing)

What it measures, per model (``_models.py``: a 12-block MLP where overhead dominates, a ~51M
parameter GPT-2-shaped LM where it should not) and per scenario (``empty``, ``save1``,
``save1_out``, ``save_all``, ``get_set_save``, ``wrapped_forward``; ``null`` for plain): the
extra time a trace costs over a plain forward pass, as the median of N interleaved (plain, trace)
pairs, with a bootstrap 95% confidence interval of that median. Two scenarios have their own
baseline (issue 3's targets): ``grad`` (save one activation's gradient) against a plain forward +
``torch.autograd.grad``, and ``early3`` (read block 3, stopping the forward there: nnglass
automatically, nnsight by ``tracer.stop()``, hooks by raising) as a time ratio to the same
framework's full-forward trace of that site. Separately, in fresh processes,
the very first trace (``save1``) and the first trace at a second new call site.

Why one subprocess per framework and model: importing nnsight patches torch (``Tensor.backward``)
and mounts ``.save`` on ``object`` (anyio's class checks reject that unless anyio was imported
first), and ``NNsight(module)`` replaces the wrapped modules' ``forward``; nothing else may share
its process. It also needs its own venv (``.bench/nnsight-venv``). Every worker runs
single-threaded on fixed inputs and prints one JSON line; a framework that fails is reported in
the table and the run goes on. Results go to ``benchmarks/results/overhead.json`` and the section
between the ``overhead`` markers of ``docs/benchmarks.md`` (rewritten whole: a run with ``--only``
or ``--frameworks`` replaces the previous results; ``--no-write`` leaves both files alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import _stats as stats
from _report import DOCS, FRAMEWORKS, MODELS, environment, save_json, tables, write_docs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_PY = ROOT / ".venv" / "bin" / "python"
NNSIGHT_PY = ROOT / ".bench" / "nnsight-venv" / "bin" / "python"
RESULTS = HERE / "results" / "overhead.json"


def worker_cmd(framework: str) -> list[str]:
    main_py = str(MAIN_PY if MAIN_PY.exists() else Path(sys.executable))
    if framework in ("plain", "hooks"):
        return [main_py, str(HERE / "_bench_torch.py"), "--framework", framework]
    if framework == "nnsight":
        return [str(NNSIGHT_PY), str(HERE / "_bench_nnsight.py")]
    return [main_py, str(HERE / f"_bench_{framework}.py")]


def ensure_nnsight_venv() -> None:
    if NNSIGHT_PY.exists():
        return
    print("nnsight venv missing: running benchmarks/setup_nnsight.sh", file=sys.stderr)
    subprocess.run(["bash", str(HERE / "setup_nnsight.sh")], check=False)


def run_worker(framework: str, model: str, mode: str, pairs: int, timeout: float) -> dict:
    cmd = [*worker_cmd(framework), "--model", model, "--mode", mode, "--pairs", str(pairs)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    t0 = time.monotonic()
    print(f"[{model}] {framework} {mode} ...", end=" ", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print("failed", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {"error": f"worker exited {proc.returncode}: {tail[0].strip()}"[:500]}


def summarize(entry: dict) -> dict:
    """Raw ns pairs -> medians in µs, CI of the median overhead, overhead / baseline."""
    st = stats.summarize(entry)
    if "error" in st:
        return st
    return {
        "overhead_us": st["overhead"],
        "ci95_us": st["overhead_ci95"],
        "plain_us": st["baseline"],  # the paired baseline: a plain forward unless `baseline` says
        "trace_us": st["trace"],
        "ratio_to_forward": st["overhead_ratio"],
        "time_ratio": st["ratio"],
        "time_ratio_ci95": st["ratio_ci95"],
        "baseline": st["baseline_kind"],
        "pairs": st["pairs"],
        "check": st["check"],
    }


def collect(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"steady": [], "cold": [], "workers": []}
    for model in args.models:
        for fw in args.frameworks:
            rec = run_worker(fw, model, "steady", args.pairs, args.timeout)
            out["workers"].append(_meta(fw, model, "steady", rec))
            scen = rec.get("scenarios") or {}
            if "error" in rec or not scen:
                err = rec.get("error", "no scenarios")
                row = {"model": model, "framework": fw, "scenario": "*", "error": err}
                out["steady"].append(row)
            for name, entry in scen.items():
                out["steady"].append({"model": model, "framework": fw, "scenario": name, **summarize(entry)})
        cold_fws = [fw for fw in args.frameworks if fw != "plain"]
        runs: dict[str, list[dict]] = {fw: [] for fw in cold_fws}
        for _ in range(args.cold_runs):
            for fw in cold_fws:  # interleave frameworks across repeats
                runs[fw].append(run_worker(fw, model, "cold", 1, args.timeout))
        for fw, recs in runs.items():
            out["cold"].append({"model": model, "framework": fw, **_cold_summary(recs)})
    for row in out["steady"]:
        if row["framework"] == "nnglass" and "overhead_us" in row and row["scenario"] != "early3":
            ref = _find(out["steady"], row["model"], "nnsight", row["scenario"])
            if ref and ref.get("overhead_us", 0) > 0:  # a ratio to a negative overhead means nothing
                row["nnglass_over_nnsight"] = row["overhead_us"] / ref["overhead_us"]
    return out


def _meta(fw: str, model: str, mode: str, rec: dict) -> dict:
    keys = ("version", "torch", "threads", "python", "executable", "n_params", "error")
    return {"framework": fw, "model": model, "mode": mode, **{k: rec[k] for k in keys if k in rec}}


def _cold_summary(recs: list[dict]) -> dict:
    ok = [r["cold"] for r in recs if "cold" in r]
    errors = [r.get("error", "no result") for r in recs if "cold" not in r]
    if not ok:
        return {"error": errors[0] if errors else "no result"}
    med = lambda key: float(np.median([c[key] for c in ok])) / 1e3
    return {
        "first_trace_us": med("first_ns"),
        "first_trace_range_us": [
            min(c["first_ns"] for c in ok) / 1e3,
            max(c["first_ns"] for c in ok) / 1e3,
        ],
        "second_site_us": med("second_site_ns"),
        "plain_us": med("plain_ns"),
        "runs": len(ok),
        "errors": errors,
        "check": ok[0]["check"],
    }


def _find(rows: list[dict], model: str, fw: str, scenario: str) -> dict | None:
    return next(
        (r for r in rows if (r["model"], r["framework"], r["scenario"]) == (model, fw, scenario)),
        None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=300, help="interleaved pairs per scenario")
    p.add_argument("--only", choices=MODELS, help="run one model")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma list")
    p.add_argument("--cold-runs", type=int, default=3, help="fresh processes per cold measure")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument("--no-write", action="store_true", help="print only; keep json and docs")
    args = p.parse_args()
    args.models = [args.only] if args.only else list(MODELS)
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = set(args.frameworks) - set(FRAMEWORKS)
    if unknown:
        p.error(f"unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}")
    if "nnsight" in args.frameworks:
        ensure_nnsight_venv()
    res = collect(args)
    env = environment(args)
    md = tables(res)
    print(md)
    if not args.no_write:
        save_json(RESULTS, env, res)
        write_docs(md, env, res)
        print(f"\nwrote {RESULTS.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
