"""Worker side of the overhead benchmark: the timing loop every framework's process runs.

Each framework (``_bench_torch.py`` for plain PyTorch and hand-registered hooks,
``_bench_nnsight.py``, ``_bench_nnglass.py``) builds its scenarios and hands them to
:func:`run_worker`, which prints exactly one JSON line on stdout; ``overhead.py`` collects it.

How a scenario is timed (``--mode steady``): one thread (``torch.set_num_threads(1)``), fixed
input, ``torch.no_grad()``, a warm-up, then N interleaved pairs of (plain forward of a pristine
copy of the model, trace of the framework's copy) timed with ``time.perf_counter_ns``; the
order inside a pair alternates, so slow drift (other processes, CPU frequency) hits both sides
equally. Raw nanoseconds go back to the driver, which takes the
median of the per-pair differences and bootstraps its confidence interval.

Two scenarios are paired with something else than a plain forward (``BASELINES``): ``grad``
(one activation's gradient) with a plain forward + ``torch.autograd.grad`` to a hooked
activation, the least work that yields that gradient; ``early3`` (read ``layers[3]``, stopping
early) with the framework's own ``full3`` trace, which reads the same site and the model's output,
so the whole forward runs: the driver reports early3 / full3 as a time ratio. ``--threads`` sets
torch's intra-op threads (1 unless asked; the language benchmark also runs 2).

``--mode cold`` times the very first trace in a fresh process (after one warm plain forward), then
the first trace at a second, never-seen call site: frameworks that parse or compile a trace's
source per call site pay that once per site.

Every scenario's result is compared with a reference computed by plain forward hooks (what
docs/reference.md defines as the truth), so a framework that skips work shows up as a failed check.
This file imports only the standard library, torch and ``_models`` (it runs in both venvs).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from _models import Bench, build

Scenario = Callable[[], Any]
GET_SET_LAYER = 5  # get_set_save: h = layers[5].output; layers[5].output = h * 2; save layers[6]
EARLY_LAYER = 3  # early3: read layers[3].output; its baseline `full3` also reads the model output
# Scenarios not timed against a plain forward: name -> what their baseline is (for the report).
BASELINES = {"grad": "forward+autograd.grad", "grad_full": "forward+autograd.grad", "early3": "full3 trace"}


def parse_args(frameworks: tuple[str, ...] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one framework's overhead worker (prints JSON)")
    p.add_argument("--model", choices=["mlp", "gpt2"], required=True)
    p.add_argument("--mode", choices=["steady", "cold"], default="steady")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=-1, help="default: max(10, pairs // 10)")
    p.add_argument("--scenarios", default="", help="comma list; default all")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    if frameworks:
        p.add_argument("--framework", choices=frameworks, required=True)
    return p.parse_args()


def setup_process(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


# --- reference results (plain forward hooks) -------------------------------------------------


def main_tensor(output: Any) -> torch.Tensor:
    """The model's output as one tensor: itself, or a transformers ModelOutput's logits."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _run_with_hooks(bench: Bench, hooks: dict[int, Callable[..., Any]]) -> Any:
    handles = [bench.layers()[i].register_forward_hook(fn) for i, fn in hooks.items()]
    try:
        return bench.forward()
    finally:
        for h in handles:
            h.remove()


def reference(bench: Bench) -> dict[str, Any]:
    """What each scenario must return, computed with plain forward hooks."""
    kept: dict[int, Any] = {}

    def keep(i: int) -> Callable[..., None]:
        return lambda _m, _a, out: kept.__setitem__(i, out.detach().clone())

    with torch.no_grad():
        out = _run_with_hooks(bench, {i: keep(i) for i in range(bench.n_layers)})
        ref = {
            "empty": None,
            "save1": kept[bench.save1_layer],
            "save1_out": [kept[bench.save1_layer], main_tensor(out)],
            "save_all": [kept[i] for i in range(bench.n_layers)],
        }
        kept.clear()
        _run_with_hooks(
            bench,
            {GET_SET_LAYER: lambda _m, _a, out: out * 2, GET_SET_LAYER + 1: keep(0)},
        )
        ref["get_set_save"] = kept[0]
    ref["early3"] = ref["save_all"][EARLY_LAYER]
    ref["grad"] = ref["grad_full"] = plain_grad(bench)
    return ref


def plain_grad(bench: Bench) -> torch.Tensor:
    """The ``grad`` baseline: a forward with one hook, then ``torch.autograd.grad`` to that site."""
    kept: list[torch.Tensor] = []
    with torch.enable_grad():
        out = _run_with_hooks(bench, {bench.save1_layer: lambda _m, _a, out: kept.append(out)})
        (grad,) = torch.autograd.grad(main_tensor(out).sum(), kept[0])
    return grad


def check(result: Any, expected: Any) -> str:
    """'exact', 'close (max |d| = x)' or 'MISMATCH: ...' (also flags results that carry grad)."""
    if expected is None:
        return "exact"
    if isinstance(expected, list):
        if not isinstance(result, (list, tuple)) or len(result) != len(expected):
            return f"MISMATCH: expected a list of {len(expected)}, got {type(result).__name__}"
        verdicts = [check(r, e) for r, e in zip(result, expected)]
        bad = [v for v in verdicts if not v.startswith(("exact", "close"))]
        if bad:
            return bad[0]
        return "exact" if all(v == "exact" for v in verdicts) else "close"
    if not isinstance(result, torch.Tensor):
        return f"MISMATCH: expected a tensor, got {type(result).__name__}"
    if result.shape != expected.shape:
        return f"MISMATCH: shape {tuple(result.shape)} != {tuple(expected.shape)}"
    note = " (result requires grad: trace ran with autograd on)" if result.requires_grad else ""
    if torch.equal(result, expected):
        return "exact" + note
    diff = (result.detach() - expected).abs().max().item()
    if torch.allclose(result.detach(), expected, atol=1e-5, rtol=1e-5):
        return f"close (max |d| = {diff:.2e}){note}"
    return f"MISMATCH: max |d| = {diff:.3e}"


# --- timing ----------------------------------------------------------------------------------


def interleaved(plain: Scenario, trace: Scenario, pairs: int, warmup: int) -> tuple[list[int], list[int]]:
    """Time ``pairs`` (plain, trace) pairs, alternating which one runs first."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        plain()
        trace()
    gc.collect()
    plain_ns: list[int] = []
    trace_ns: list[int] = []
    for i in range(pairs):
        if i % 2 == 0:
            t0 = clock()
            plain()
            t1 = clock()
            trace()
            t2 = clock()
            plain_ns.append(t1 - t0)
            trace_ns.append(t2 - t1)
        else:
            t0 = clock()
            trace()
            t1 = clock()
            plain()
            t2 = clock()
            trace_ns.append(t1 - t0)
            plain_ns.append(t2 - t1)
    return plain_ns, trace_ns


def _error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:500]


def _baseline(name: str, base: Bench, scenarios: dict[str, Scenario]) -> Scenario:
    """What a scenario is paired with: a plain forward, except for ``BASELINES``."""
    if name.startswith("grad"):
        return lambda: plain_grad(base)
    if name == "early3":  # the framework's own full-forward trace reading the same site
        return scenarios["full3"]
    return base.forward


def _checked(bench: Bench, result: Callable[[], Any], expected: Any) -> str:
    """check(result(), expected), flagging a trace that leaves gradients in the parameters."""
    for p in bench.module.parameters():
        p.grad = None
    verdict = check(result(), expected)
    touched = sum(p.grad is not None for p in bench.module.parameters())
    return verdict + (f" (set .grad of {touched} parameters)" if touched else "")


def _steady(args: argparse.Namespace, bench: Bench, base: Bench, scenarios: dict[str, Scenario]) -> dict:
    wanted = [s for s in args.scenarios.split(",") if s] or list(scenarios)
    warmup = args.warmup if args.warmup >= 0 else max(10, args.pairs // 10)
    ref = reference(base)
    out: dict[str, Any] = {}
    for name in wanted:
        if name not in scenarios or name == "full3":
            continue
        entry: dict[str, Any] = {"baseline": BASELINES.get(name, "forward")}
        try:
            with torch.no_grad():
                entry["check"] = _checked(bench, scenarios[name], ref.get(name))
                paired = _baseline(name, base, scenarios)
                plain_ns, trace_ns = interleaved(paired, scenarios[name], args.pairs, warmup)
            entry.update(plain_ns=plain_ns, trace_ns=trace_ns)
        except Exception as exc:
            entry["error"] = _error(exc)
        out[name] = entry
    return out


def _cold(bench: Bench, base: Bench, first: Scenario, second: Scenario) -> dict:
    clock = time.perf_counter_ns
    ref = reference(base)["save1"]
    with torch.no_grad():
        bench.forward()  # one warm plain forward: the model itself is warm, the framework is not
        t0 = clock()
        r1 = first()
        t1 = clock()
        r2 = second()
        t2 = clock()
        plain = []
        for _ in range(15):
            t = clock()
            base.forward()
            plain.append(clock() - t)
    plain.sort()
    return {
        "first_ns": t1 - t0,
        "second_site_ns": t2 - t1,
        "plain_ns": plain[len(plain) // 2],
        "check": check(r1, ref) + " / " + check(r2, ref),
    }


def run_worker(
    framework: str,
    version: str,
    args: argparse.Namespace,
    make: Callable[[Bench], dict[str, Scenario]],
) -> None:
    """Build the model, run ``make(bench)``'s scenarios, print one JSON line.

    The model is built twice from the same seed: ``make`` wraps one copy, and the plain forward
    every trace is paired with runs on the other, pristine copy. (Wrapping may change the module:
    nnsight 0.8.1 replaces every submodule's ``forward`` with a wrapper, which slows untraced
    calls too; the ``wrapped_forward`` scenario measures that tax.)

    In cold mode ``make`` must return ``save1`` and ``save1_second_site``: the same trace
    written at two different places in the source.
    """
    setup_process(args.threads)
    record: dict[str, Any] = {
        "framework": framework,
        "version": version,
        "model": args.model,
        "mode": args.mode,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "executable": sys.executable,
    }
    try:
        bench, base = build(args.model), build(args.model)
        record["n_params"] = bench.n_params
        scenarios = make(bench)
        if args.mode == "cold":
            first, second = scenarios["save1"], scenarios["save1_second_site"]
            record["cold"] = _cold(bench, base, first, second)
        else:
            scenarios.pop("save1_second_site", None)
            record["scenarios"] = _steady(args, bench, base, scenarios)
    except Exception as exc:
        record["error"] = _error(exc)
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
