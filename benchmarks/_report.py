"""Rendering of the overhead benchmark's results: markdown tables and the docs section.

Used by ``overhead.py`` (main venv only). ``write_docs`` rewrites the part of
``docs/benchmarks.md`` between the ``overhead`` markers, creating the file if it is missing, so
hand-written text around the section survives a rerun.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
FRAMEWORKS = ("plain", "hooks", "nnsight", "nnglass")
MODELS = ("mlp", "gpt2")
SCENARIOS = (
    "null", "empty", "save1", "save1_out", "save_all", "get_set_save", "grad", "grad_full", "early3",
    "wrapped_forward",
)
EARLY_TARGET = {"mlp": 0.40}  # issue 3: reading layer 3 of 12 <= 0.40x a full-forward trace


def _order(row: dict) -> tuple[int, int, int]:
    s = row["scenario"]
    return (
        MODELS.index(row["model"]),
        SCENARIOS.index(s) if s in SCENARIOS else 99,
        FRAMEWORKS.index(row["framework"]),
    )


def tables(res: dict[str, Any]) -> str:
    """Markdown tables (also what the console shows)."""
    lines = [
        "| model | scenario | framework | overhead µs (median) | 95% CI | ÷ baseline "
        "| nnglass ÷ nnsight | check |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for r in sorted(res["steady"], key=_order):
        if r["scenario"] == "early3":
            continue
        head = f"| {r['model']} | {r['scenario']} | {r['framework']} |"
        if "error" in r:
            lines.append(f"{head} error | | | | {r['error'].replace('|', '/')} |")
            continue
        lo, hi = r["ci95_us"]
        ratio = r.get("nnglass_over_nnsight")
        lines.append(
            f"{head} {r['overhead_us']:.1f} | [{lo:.1f}, {hi:.1f}] | "
            f"{r['ratio_to_forward']:.3f} | {'' if ratio is None else f'{ratio:.2f}'} |"
            f" {r['check']} |"
        )
    lines += ["", *early_table(res["steady"]), "", *targets_table(res["steady"])]
    lines += [
        "",
        "First trace in a fresh process (`save1`, after one warm plain forward), and the "
        "first trace at a second new call site in that process; medians over fresh processes "
        "(range, processes ok/run):",
        "",
        "| model | framework | first trace µs | range (ok/run) | second new site µs | plain forward µs |",
        "|---|---|---:|---|---:|---:|",
    ]
    for c in sorted(res["cold"], key=lambda c: (MODELS.index(c["model"]), FRAMEWORKS.index(c["framework"]))):
        if "error" in c:
            lines.append(f"| {c['model']} | {c['framework']} | error | | | {c['error'].replace('|', '/')} |")
            continue
        lo, hi = c["first_trace_range_us"]
        lines.append(
            f"| {c['model']} | {c['framework']} | {c['first_trace_us']:.0f} | "
            f"{lo:.0f}-{hi:.0f} ({c['runs']}/{c['runs'] + len(c['errors'])}) | "
            f"{c['second_site_us']:.0f} | {c['plain_us']:.0f} |"
        )
    return "\n".join(lines)


def early_table(rows: list[dict]) -> list[str]:
    """early3 (stop after block 3) as a time ratio to the framework's own full-forward trace."""
    lines = [
        "Reading `layers[3].output` and stopping there (`early3`; nnglass: automatic, nnsight: "
        "`tracer.stop()`, hooks: a hook that raises) against the same framework's trace of that "
        "site plus the model output (`full3`, the whole forward runs); ratio of medians, "
        "bootstrap 95% CI:",
        "",
        "| model | framework | early3 µs | full3 µs | early3 ÷ full3 | 95% CI | target | check |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in sorted(rows, key=_order):
        if r["scenario"] != "early3":
            continue
        head = f"| {r['model']} | {r['framework']} |"
        if "error" in r:
            lines.append(f"{head} error | | | | | {r['error'].replace('|', '/')} |")
            continue
        lo, hi = r["time_ratio_ci95"]
        target = EARLY_TARGET.get(r["model"]) if r["framework"] == "nnglass" else None
        met = target is not None and r["time_ratio"] <= target
        verdict = "" if target is None else f"≤ {target:.2f}: {'met' if met else 'NOT met'}"
        lines.append(
            f"{head} {r['trace_us']:.1f} | {r['plain_us']:.1f} | {r['time_ratio']:.3f} | "
            f"[{lo:.3f}, {hi:.3f}] | {verdict} | {r['check']} |"
        )
    return lines


def verdict(met: bool, ci_a: Sequence[float], ci_b: Sequence[float]) -> str:
    """'yes' / 'NO', saying when the two 95% CIs overlap (the medians' order is then noise)."""
    overlap = ci_a[0] <= ci_b[1] and ci_b[0] <= ci_a[1]
    return ("yes" if met else "NO") + (" (CIs overlap)" if overlap else "")


def targets_table(rows: list[dict]) -> list[str]:
    """Issue 3's benchmark targets, judged on this run's medians."""
    lines = ["Issue 3's targets (medians of this run):", "", "| model | target | measured | met |",
             "|---|---|---|---|"]
    ok = {(r["model"], r["framework"], r["scenario"]): r for r in rows if "error" not in r}
    find = lambda model, fw, scenario: ok.get((model, fw, scenario))
    for model in MODELS:
        ng, ns = find(model, "nnglass", "grad"), find(model, "nnsight", "grad")
        if ng and ns:
            (a, b), (c, d) = ng["ci95_us"], ns["ci95_us"]
            lines.append(
                f"| {model} | grad: overhead over forward + autograd.grad ≤ nnsight's | "
                f"{ng['overhead_us']:.1f} µs [{a:.1f}, {b:.1f}] vs {ns['overhead_us']:.1f} µs "
                f"[{c:.1f}, {d:.1f}] | {verdict(ng['overhead_us'] <= ns['overhead_us'], (a, b), (c, d))} |"
            )
        early = find(model, "nnglass", "early3")
        if early and model in EARLY_TARGET:
            lo, hi = early["time_ratio_ci95"]
            met = early["time_ratio"] <= EARLY_TARGET[model]
            lines.append(
                f"| {model} | early3: layer 3 of 12 ≤ {EARLY_TARGET[model]:.2f}x a full-forward trace | "
                f"{early['time_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | {'yes' if met else 'NO'} |"
            )
    return lines


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": 1,
        "pairs": args.pairs,
        "cold_runs": args.cold_runs,
        "command": " ".join(["python benchmarks/overhead.py", *sys.argv[1:]]),
    }


def write_docs(md: str, env: dict[str, Any], res: dict[str, Any], path: Path = DOCS) -> None:
    versions = sorted(
        {
            f"{w['framework']} {w['version']}"
            for w in res["workers"]
            if "version" in w and w["framework"] in ("nnsight", "nnglass")
        }
    )
    torch_v = next((w["torch"] for w in res["workers"] if "torch" in w), "?")
    section = "\n".join(
        [
            START,
            f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores), 1 thread, torch "
            f"{torch_v}{', ' if versions else ''}{', '.join(versions)}; `{env['command']}`.",
            "",
            f"- overhead = trace - plain forward (of a pristine copy of the model): median of "
            f"{env['pairs']} interleaved pairs; 95% CI: bootstrap of that median; "
            "÷ baseline: overhead / baseline time (a plain forward, except for `grad`).",
            "- `hooks`: the same work hand-written with forward hooks; on the MLP, "
            "`save_all`/`hooks` is the hooks floor. `plain`/`null`: the method's own bias.",
            "- nnglass stops the forward pass once nothing else is needed (docs/reference.md), so its "
            "`save1`, `save_all` and `get_set_save` rows include work it skipped (negative on "
            "GPT-2: no `ln_f`/`lm_head`); `save1_out` also saves the model output, so every "
            "framework runs the whole pass: that row is pure overhead.",
            "- `grad`: the gradient of `output.sum()` w.r.t. the middle block's output; its baseline "
            "(÷ baseline) is a plain forward + `torch.autograd.grad` to a hooked activation. nnsight "
            "reads it in `with loss.backward(inputs=[h]):` (only what `h` needs, like nnglass); "
            "`grad_full` is nnsight's documented `with loss.backward():`, which also fills every "
            "parameter's `.grad`.",
            "- `wrapped_forward`: an untraced call of the wrapped module (NNsight replaces every "
            "submodule's `forward` when it wraps a model).",
            "",
            md,
            END,
        ]
    )
    replace_section(path, START, END, section, "Overhead")


def save_json(path: Path, env: dict[str, Any], res: dict[str, Any]) -> None:
    """A benchmark's raw results, with the environment that produced them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, **res}, indent=1) + "\n")


def replace_section(path: Path, start: str, end: str, section: str, heading: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) in place of the text
    between those markers in ``path``, or append it under ``## heading``; the rest survives."""
    text = (
        path.read_text()
        if path.exists()
        else (
            "# Benchmarks\n\nHow much tracing costs over a plain forward pass. Produced by "
            "`make bench` (= `python benchmarks/overhead.py`).\n\n"
        )
    )
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
