"""`.source` benchmark: SmolLM2-135M's attention probabilities through nnglass vs transformers.

    python benchmarks/source.py [--pairs 20] [--threads 1] [--no-write]

On one 31-token prompt, with eager attention, as medians of interleaved (plain forward, X)
pairs with bootstrap 95% confidence intervals (``_stats.py``):

- ``output_attentions``: a plain forward with ``output_attentions=True`` (every layer's
  probabilities: the "hack" `.source` replaces);
- ``source_all``: an nnglass trace saving all 30 layers' ``self_attn.source.softmax_0.output``
  and the logits (checked bitwise equal to ``output_attentions``);
- ``source_edit``: an nnglass trace zeroing one head's pattern in layer 5, saving the logits;
- ``first_signature``: the same ``source_all`` trace at a prompt width not seen before (the
  record-time listing of the operations runs once per input signature), against itself at
  a known width.

Writes ``benchmarks/results/source.json`` and the section between the ``source`` markers of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from _report import DOCS, environment, replace_section, save_json
from _stats import summarize

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "source.json"
START, END = "<!-- source:start -->", "<!-- source:end -->"
PROMPT = ("The Eiffel Tower is in the city of Paris, and the Colosseum is in the city of Rome, "
          "while the Brandenburg Gate stands in")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nnglass import LanguageModel

    lm = LanguageModel("smollm2-135m", attn_implementation="eager")
    hf = lm.module
    enc = lm.tokenizer(PROMPT, return_tensors="pt")
    ids = enc["input_ids"][:, :31]
    mask = torch.ones_like(ids)
    layers = hf.config.num_hidden_layers

    @torch.no_grad()
    def plain(**kw: Any) -> Any:
        return hf(input_ids=ids, attention_mask=mask, use_cache=False, **kw)

    def source_all(x: torch.Tensor) -> tuple[list[Any], Any]:
        with lm.trace(x):
            probs = [lm.model.layers[i].self_attn.source.softmax_0.output.save() for i in range(layers)]
            logits = lm.output.logits.save()
        return probs, logits

    def source_edit() -> Any:
        with lm.trace(ids):
            lm.model.layers[5].self_attn.source.softmax_0.output[:, 2] = 0
            logits = lm.output.logits.save()
        return logits

    probs, _ = source_all(ids)
    ref = plain(output_attentions=True).attentions
    same = all(torch.equal(p.value, r) for p, r in zip(probs, ref))

    scenarios = {
        "output_attentions": lambda: plain(output_attentions=True),
        "source_all": lambda: source_all(ids),
        "source_edit": source_edit,
    }
    res: dict[str, Any] = {"rows": [], "bitwise_equal_to_output_attentions": same}
    for name, fn in scenarios.items():
        base_ns, trace_ns = [], []
        for _ in range(args.pairs):
            t0 = time.perf_counter_ns()
            plain()
            t1 = time.perf_counter_ns()
            fn()
            t2 = time.perf_counter_ns()
            base_ns.append(t1 - t0)
            trace_ns.append(t2 - t1)
        res["rows"].append({"scenario": name, **summarize({"plain_ns": base_ns, "trace_ns": trace_ns}, 1e6)})

    known, fresh = [], []  # a known width, then a width never traced before (ops listed again)
    vocab = hf.config.vocab_size
    for k in range(min(args.pairs, 12)):
        new = torch.randint(3, vocab, (1, 32 + k), generator=torch.Generator().manual_seed(k))
        t0 = time.perf_counter_ns()
        source_all(ids)
        t1 = time.perf_counter_ns()
        source_all(new[:, :31 + k + 1])
        t2 = time.perf_counter_ns()
        known.append(t1 - t0)
        fresh.append(t2 - t1)
    first = summarize({"plain_ns": known, "trace_ns": fresh}, 1e6)
    res["rows"].append({"scenario": "first_signature", **first})

    lines = [START, "", f"SmolLM2-135M, eager attention, one 31-token prompt, {args.threads} thread(s), "
             f"{args.pairs} interleaved pairs (`python benchmarks/source.py`). Times in ms; the "
             "baseline is a plain forward (for `first_signature`: the same trace at a known width).", "",
             "| scenario | baseline | with | overhead (95% CI) | ratio |", "|---|---|---|---|---|"]
    for row in res["rows"]:
        lo, hi = row["overhead_ci95"]
        lines.append(f"| {row['scenario']} | {row['baseline']:.1f} | {row['trace']:.1f} | "
                     f"{row['overhead']:+.1f} ({lo:+.1f}, {hi:+.1f}) | {row['ratio']:.2f}x |")
    lines += ["", f"`source_all` is bitwise equal to `output_attentions=True`: {same}.", "", END]
    print("\n".join(lines[2:-1]))
    if not args.no_write:
        env = {**environment(argparse.Namespace(pairs=args.pairs, cold_runs=0)), "threads": args.threads,
               "command": "python benchmarks/source.py " + f"--pairs {args.pairs} --threads {args.threads}"}
        save_json(RESULTS, env, res)
        replace_section(DOCS, START, END, "\n".join(lines), "`.source`: attention probabilities")


if __name__ == "__main__":
    main()
