"""Language-model worker for nnsight 0.8.1 (``language.py``).

Runs only in ``.bench/nnsight-venv``, in a process of its own (importing nnsight patches torch
and ``object``; see ``_bench_nnsight.py``). The model is the same converted SmolLM2 folder, loaded
with ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)`` and wrapped with
``nnsight.LanguageModel(model, tokenizer=...)`` (deprecated in 0.8.1 in favour of
``TransformersModel(..., task="text-generation")``, which it subclasses unchanged). Prompts go in
as text. Traces pass ``use_cache=False``, as nnglass's traces and the plain forward do.

- ``logits``, ``save_all``, ``save_all_out``: as nnglass's (the list of saved layers is
  ``.save()``d too, or it does not leave the block in 0.8.1);
- ``early3``: save ``model.layers[3].output``, then ``tracer.stop()`` (no automatic stop);
- ``generate``: ``for step in tracer.iter[:16]: model.layers[12].output[:, -1] += steer``, then
  ``tracer.result.save()``. The loop is bounded: after an open ``tracer.all()`` loop nothing in
  the block runs in 0.8.1 (its last request waits for a step that never comes), so the result
  could not be saved after it.
"""

from __future__ import annotations

import warnings
from typing import Any

import nnsight
import torch

from _lm import (
    EARLY_LAYER,
    MAX_NEW,
    N_LAYERS,
    PROMPT,
    STEER_LAYER,
    LMBench,
    Scenario,
    load_plain,
    parse_args,
    run_lm_worker,
)


def logits(lm: Any) -> torch.Tensor:
    with lm.trace(PROMPT, use_cache=False):
        out = lm.output.logits.save()
    return out


def save_all(lm: Any) -> list[torch.Tensor]:
    with lm.trace(PROMPT, use_cache=False):
        outs = [lm.model.layers[i].output.save() for i in range(N_LAYERS)]
        outs.save()
    return outs


def save_all_out(lm: Any) -> list[torch.Tensor]:
    with lm.trace(PROMPT, use_cache=False):
        outs = [lm.model.layers[i].output.save() for i in range(N_LAYERS)]
        outs.append(lm.output.logits.save())
        outs.save()
    return outs


def early3(lm: Any) -> torch.Tensor:
    with lm.trace(PROMPT, use_cache=False) as tracer:
        h = lm.model.layers[EARLY_LAYER].output.save()
        tracer.stop()
    return h


def generate(lm: Any, steer: torch.Tensor) -> torch.Tensor:
    with lm.generate(PROMPT, max_new_tokens=MAX_NEW, do_sample=False) as tracer:
        for _step in tracer.iter[:MAX_NEW]:
            lm.model.layers[STEER_LAYER].output[:, -1] += steer
        tokens = tracer.result.save()
    return tokens


def make(bench: LMBench) -> dict[str, Scenario]:
    model, tok = load_plain()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        lm = nnsight.LanguageModel(model, tokenizer=tok)
    return {
        "logits": lambda: logits(lm),
        "save_all": lambda: save_all(lm),
        "save_all_out": lambda: save_all_out(lm),
        "early3": lambda: early3(lm),
        "generate": lambda: generate(lm, bench.steer),
    }


if __name__ == "__main__":
    run_lm_worker("nnsight", nnsight.__version__, parse_args(), make)
