"""Language-model worker for nnglass (``language.py``), written against docs/reference.md.

``LanguageModel("smollm2-135m")`` is the built-in name: with ``NNGLASS_CACHE`` pointing at the
cache the driver names, it loads the converted folder the pristine copy also comes from. Prompts
go in as text (nnglass tokenizes on every trace, as a user's code would). Scenarios:

- ``logits``: ``lm.output.logits.save()`` (the whole forward runs);
- ``save_all``: every ``lm.model.layers[i].output.save()`` (the forward may stop after the last
  layer); ``save_all_out``: the same and ``lm.output.logits.save()`` (the whole forward runs);
- ``meta_first`` / ``meta_again``: ``save_all`` with each output untupled by ``isinstance``
  (record-time metadata), at an unseen / a known input signature;
- ``early3``: ``lm.model.layers[3].output.save()`` alone: nnglass stops the forward by itself
  once nothing else is needed (docs/reference.md);
- ``generate``: ``with lm.generate(prompt, max_new_tokens=16) as tr: with tr.all():
  lm.model.layers[12].output[:, -1] += steer``, and ``tr.result.save()`` for the tokens.

Runs in ``/work/main/.venv`` in a process of its own; prints one JSON line.
"""

from __future__ import annotations

from typing import Any

import torch

import nnglass
from _lm import (
    EARLY_LAYER,
    MAX_NEW,
    N_LAYERS,
    PROMPT,
    STEER_LAYER,
    LMBench,
    Scenario,
    parse_args,
    run_lm_worker,
)
from nnglass import LanguageModel
from nnglass.models.fake import FakeCache


def logits(lm: Any) -> torch.Tensor:
    with lm.trace(PROMPT):
        out = lm.output.logits.save()
    return out.value


def save_all(lm: Any) -> list[torch.Tensor]:
    with lm.trace(PROMPT):
        outs = [lm.model.layers[i].output.save() for i in range(N_LAYERS)]
    return [o.value for o in outs]


def save_all_out(lm: Any) -> list[torch.Tensor]:
    with lm.trace(PROMPT):
        outs = [lm.model.layers[i].output.save() for i in range(N_LAYERS)]
        outs.append(lm.output.logits.save())
    return [o.value for o in outs]


def untupled_all(lm: Any) -> list[torch.Tensor]:
    """save_all as nnsight users write it: `isinstance` asks for record-time metadata."""
    with lm.trace(PROMPT):
        outs = []
        for i in range(N_LAYERS):
            out = lm.model.layers[i].output
            h = out[0] if isinstance(out, tuple) else out
            outs.append(h.save())
    return [o.value for o in outs]


def meta_first(lm: Any) -> list[torch.Tensor]:
    """A first trace at a new input signature: the per-signature metadata cache is emptied
    (what any unseen prompt shape meets; the model-level meta copy, built once, stays)."""
    object.__setattr__(lm, "_fake_sites", FakeCache())
    return untupled_all(lm)


def early3(lm: Any) -> torch.Tensor:
    with lm.trace(PROMPT):
        h = lm.model.layers[EARLY_LAYER].output.save()
    return h.value


def generate(lm: Any, steer: torch.Tensor) -> torch.Tensor:
    with lm.generate(PROMPT, max_new_tokens=MAX_NEW, do_sample=False) as tr:
        with tr.all():
            lm.model.layers[STEER_LAYER].output[:, -1] += steer
        tokens = tr.result.save()
    return tokens.value


def make(bench: LMBench) -> dict[str, Scenario]:
    lm = LanguageModel("smollm2-135m")
    lm.module  # load the weights now, not inside the first timed trace  # noqa: B018
    return {
        "logits": lambda: logits(lm),
        "save_all": lambda: save_all(lm),
        "save_all_out": lambda: save_all_out(lm),
        "early3": lambda: early3(lm),
        "meta_first": lambda: meta_first(lm),
        "meta_again": lambda: untupled_all(lm),
        "generate": lambda: generate(lm, bench.steer),
    }


if __name__ == "__main__":
    run_lm_worker("nnglass", nnglass.__version__, parse_args(), make)
