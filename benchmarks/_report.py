"""Rendering of the overhead benchmark's results: markdown tables and the docs section.

Used by ``overhead.py`` (main venv only). ``write_docs`` rewrites the part of
``docs/benchmarks.md`` between the ``overhead`` markers, creating the file if it is missing, so
hand-written text around the section survives a rerun.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
FRAMEWORKS = ("plain", "hooks", "nnsight", "nnglass")
MODELS = ("mlp", "gpt2")
SCENARIOS = ("null", "empty", "save1", "save1_out", "save_all", "get_set_save", "wrapped_forward")


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
        "| model | scenario | framework | overhead µs (median) | 95% CI | ÷ forward "
        "| nnglass ÷ nnsight | check |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for r in sorted(res["steady"], key=_order):
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
            "÷ forward: overhead / plain forward time.",
            "- `hooks`: the same work hand-written with forward hooks; on the MLP, "
            "`save_all`/`hooks` is the hooks floor. `plain`/`null`: the method's own bias.",
            "- nnglass stops the forward pass once nothing else is needed (DESIGN §2), so its "
            "`save1`, `save_all` and `get_set_save` rows include work it skipped (negative on "
            "GPT-2: no `ln_f`/`lm_head`); `save1_out` also saves the model output, so every "
            "framework runs the whole pass: that row is pure overhead.",
            "- `wrapped_forward`: an untraced call of the wrapped module (NNsight replaces every "
            "submodule's `forward` when it wraps a model).",
            "",
            md,
            END,
        ]
    )
    text = (
        path.read_text()
        if path.exists()
        else (
            "# Benchmarks\n\nHow much tracing costs over a plain forward pass. Produced by "
            "`make bench` (= `python benchmarks/overhead.py`).\n\n"
        )
    )
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Overhead\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
