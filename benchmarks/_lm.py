"""Worker side of the language-model benchmark (``language.py``): SmolLM2-135M, one prompt.

Each framework's worker (``_lm_torch.py`` for plain transformers and hand-registered hooks,
``_lm_nnsight.py``, ``_lm_nnglass.py``) builds its scenarios from an :class:`LMBench` and hands
them to :func:`run_lm_worker`, which prints one JSON line. Every process loads the same weights:
the float32 safetensors folder nnglass converted into ``$NNGLASS_CACHE/models/smollm2-135m`` (a
plain transformers folder), once for the pristine copy every trace is paired with, and once more
inside the framework (nnsight replaces the forwards of the modules it wraps).

Scenarios, each timed as interleaved (baseline, trace) pairs with the ``_harness`` loop, under
``torch.no_grad()``, with ``--threads`` intra-op threads:

- ``null`` (plain): a forward against a forward, ``generate_null``: a generation against itself
  (the method's own bias);
- ``logits``: a trace saving the logits (the whole forward runs);
- ``save_all``: every decoder layer's output (hooks: 30 hand-registered hooks keeping outputs);
  nnglass may stop after the last layer (no final norm, no ``lm_head``), so ``save_all_out``
  also saves the logits: every framework then runs the whole forward, a like-for-like overhead;
- ``meta_first`` / ``meta_again`` (nnglass only): ``save_all`` written the nnsight way, each
  layer's output untupled with ``isinstance`` (record-time metadata), at a signature the model
  has not seen (its metadata cache emptied before each trace) / at a known one; paired with
  the framework's own ``save_all`` (``PAIRED_WITH``), so the overhead is metadata's alone;
- ``early3``: ``model.layers[3].output`` and stop there (nnglass: automatically; nnsight:
  ``tracer.stop()``; hooks: a hook that raises); reported as a time ratio to a plain forward;
- ``generate``: 16-token greedy generation adding ``STEER`` to ``model.layers[12].output[:, -1]``
  at every step, paired with plain ``model.generate`` under a forward hook doing the same.

Results are checked against plain-hook references computed here ("exact" / "close" / "DIFFERS").
Imports only the standard library, torch, transformers and ``_harness`` (runs in both venvs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _harness import _error, check, interleaved, setup_process

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NNGLASS_CACHE", ROOT / ".nnglass-cache"))
FOLDER = CACHE / "models" / "smollm2-135m"
PROMPT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel"
)
PROMPT_TOKENS = 31
N_LAYERS = 30
EARLY_LAYER = 3
STEER_LAYER = 12
MAX_NEW = 16
STEER_SEED, STEER_SCALE = 0, 2.0
GENERATE_SCENARIOS = ("generate", "generate_null")  # paired with a plain steered generate
# Paired with the framework's own trace doing the same without metadata (issue 12's targets).
PAIRED_WITH = {"meta_first": "save_all", "meta_again": "save_all"}

Scenario = Callable[[], Any]


@dataclass
class LMBench:
    """The fixed inputs every framework uses, and a pristine model to pair traces with."""

    model: Any  # pristine transformers model (never wrapped)
    tokenizer: Any
    ids: dict[str, torch.Tensor]  # the prompt, tokenized once (what the plain runs get)
    steer: torch.Tensor

    def forward(self) -> Any:
        return self.model(**self.ids, use_cache=False)

    def generate(self) -> torch.Tensor:
        """Plain steered generation: a forward hook adds ``steer`` at the last position."""

        def add(_m: Any, _a: Any, out: torch.Tensor) -> None:
            out[:, -1] += self.steer

        handle = self.model.model.layers[STEER_LAYER].register_forward_hook(add)
        try:
            return self.model.generate(**self.ids, max_new_tokens=MAX_NEW, do_sample=False)
        finally:
            handle.remove()


def load_plain() -> tuple[Any, Any]:
    """The converted SmolLM2 folder as plain transformers objects, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (FOLDER / "config.json").exists():
        raise FileNotFoundError(f"{FOLDER} missing: run LanguageModel('smollm2-135m') once to convert")
    model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(FOLDER)


def build() -> LMBench:
    model, tok = load_plain()
    enc = tok(PROMPT, return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if ids["input_ids"].shape[1] != PROMPT_TOKENS:
        raise ValueError(f"prompt is {ids['input_ids'].shape[1]} tokens, expected {PROMPT_TOKENS}")
    gen = torch.Generator().manual_seed(STEER_SEED)
    steer = torch.randn(model.config.hidden_size, generator=gen) * STEER_SCALE
    return LMBench(model, tok, ids, steer)


def reference(b: LMBench) -> dict[str, Any]:
    """Each scenario's expected result, from plain forward hooks on the pristine model."""
    kept: dict[int, torch.Tensor] = {}
    layers = b.model.model.layers
    handles = [
        layers[i].register_forward_hook(lambda _m, _a, out, i=i: kept.__setitem__(i, out.clone()))
        for i in range(N_LAYERS)
    ]
    try:
        with torch.no_grad():
            logits = b.forward().logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        steered = b.generate()
        unsteered = b.model.generate(**b.ids, max_new_tokens=MAX_NEW, do_sample=False)
    return {
        "null": None,
        "logits": logits,
        "save_all": [kept[i] for i in range(N_LAYERS)],
        "save_all_out": [*(kept[i] for i in range(N_LAYERS)), logits],
        "meta_first": [kept[i] for i in range(N_LAYERS)],
        "meta_again": [kept[i] for i in range(N_LAYERS)],
        "early3": kept[EARLY_LAYER],
        "generate": steered,
        "generate_null": steered,
        "steer_changes_tokens": not torch.equal(steered, unsteered),
    }


def verdict(result: Any, expected: Any) -> str:
    """The harness's check, in this table's words: 'exact', 'close (...)' or 'DIFFERS ...'."""
    if isinstance(expected, torch.Tensor) and not expected.is_floating_point():  # token ids
        if isinstance(result, torch.Tensor) and result.shape == expected.shape:
            if torch.equal(result, expected):
                return "exact"
            same = int((result == expected)[:, PROMPT_TOKENS:].all(0).sum())
            return f"DIFFERS ({same}/{MAX_NEW} new tokens equal)"
        return f"DIFFERS: got {type(result).__name__} {getattr(result, 'shape', '')}"
    return check(result, expected).replace("MISMATCH", "DIFFERS")


def parse_args(frameworks: tuple[str, ...] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one framework's language-model worker (prints JSON)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=40, help="pairs per forward scenario")
    p.add_argument("--gen-pairs", type=int, default=12, help="pairs per generation scenario")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scenarios", default="", help="comma list; default all")
    if frameworks:
        p.add_argument("--framework", choices=frameworks, required=True)
    return p.parse_args()


def _time(args: argparse.Namespace, b: LMBench, scenarios: dict[str, Scenario]) -> dict[str, Any]:
    wanted = [s for s in args.scenarios.split(",") if s] or list(scenarios)
    ref = reference(b)
    out: dict[str, Any] = {}
    for name in wanted:
        if name not in scenarios:
            continue
        is_gen = name in GENERATE_SCENARIOS
        paired = PAIRED_WITH.get(name)
        entry: dict[str, Any] = {"baseline": paired or ("generate" if is_gen else "forward")}
        try:
            with torch.no_grad():
                entry["check"] = verdict(scenarios[name](), ref[name])
                base = scenarios[paired] if paired else b.generate if is_gen else b.forward
                pairs, warmup = (args.gen_pairs, 1) if is_gen else (args.pairs, args.warmup)
                entry["plain_ns"], entry["trace_ns"] = interleaved(base, scenarios[name], pairs, warmup)
        except Exception as exc:
            entry["error"] = _error(exc)
        out[name] = entry
    out["_steer_changes_tokens"] = ref["steer_changes_tokens"]
    return out


def run_lm_worker(framework: str, version: str, args: argparse.Namespace,
                  make: Callable[[LMBench], dict[str, Scenario]]) -> None:
    """Load the pristine copy, build ``make(bench)``'s scenarios, time them, print one JSON line."""
    setup_process(args.threads)
    import transformers

    record: dict[str, Any] = {
        "framework": framework,
        "version": version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "executable": sys.executable,
    }
    try:
        bench = build()
        scenarios = make(bench)
        timed = _time(args, bench, scenarios)
        record["steer_changes_tokens"] = timed.pop("_steer_changes_tokens")
        record["scenarios"] = timed
    except Exception as exc:
        record["error"] = _error(exc)
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
