"""Generate graphs as jobs of a continuous batch (runtime/decode_batch.py): which graphs may
share one, and what a language model hands the batch for each.

Invariants:
- Only a plain generate graph shares a batch: no session, no `.source` operations, no
  gradients (a backward would cross rows), no scan first, no forward options (a generate
  job's forward is the batch's), no tensor among its generate options. Anything else runs alone, as before.
- A job's prompts, rules and seed are exactly what `LanguageModel._run_generate` uses
  alone: its ids left-padded to its own width, the generate options with the tokenizer's
  pad id, the model's generation config under them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..graph.ir import (
    BACKWARD,
    FORWARD_KWARGS,
    GENERATE,
    GENERATE_KWARGS,
    GRAD,
    GROUPS,
    IMPORT,
    SEED,
    SET_GRAD,
    VALIDATE,
    Graph,
    TensorRef,
    find,
)
from ..graph.merge import merge
from ..graph.ops import REGISTRY
from ..runtime.decode_batch import DecodeBatch, GenerateJob, StepObserver
from ..runtime.limits import NO_LIMITS, RunConfig, RunLimits
from ..runtime.plan import cached_plan
from ..runtime.steps import StepListener
from ..runtime.values import resolve
from ..runtime.window import model_sizes
from .decode_rules import decode_rules
from .stop_strings import stop_rule

if TYPE_CHECKING:
    from .language import LanguageModel

_NOT_SHARED = frozenset({BACKWARD, GRAD, SET_GRAD, IMPORT})
GENERATION = "generate\n"  # every generation key starts so (a trace's key never does)


def generation_key(graph: Graph) -> str | None:
    """Graphs with the same key can share one continuous batch; None: runs alone."""
    if graph.mode != GENERATE or graph.children or graph.options.get(VALIDATE):
        return None
    if graph.options.get(FORWARD_KWARGS) or any(n.op in _NOT_SHARED for n in graph.nodes):
        return None
    if find(graph.options.get(GENERATE_KWARGS, {}), TensorRef) is not None:
        return None
    try:
        if cached_plan(graph, REGISTRY).source_specs:
            return None  # operations inside a module (`.source`): their hooks are per run
    except Exception:
        return None  # a graph that cannot be planned fails alone, with its own error
    return f"{GENERATION}{graph.model}"


def generate_job(lm: LanguageModel, graph: Graph, key: Any, limits: RunLimits = NO_LIMITS,
                 on_step: StepListener | None = None) -> GenerateJob:
    """One generate graph as a job of `lm`'s batch (raises for a graph that cannot be one)."""
    from .prompts import batch_prompts, check_generate_kwargs

    if generation_key(graph) is None:
        raise ValueError("this graph cannot share a generation batch")
    ids, mask, rows = batch_prompts(graph, lm.tokenizer.pad_token_id)
    options = dict(resolve(graph.options.get(GENERATE_KWARGS, {}), [], graph.tensors))
    check_generate_kwargs({k: v for k, v in options.items() if k != "max_new_tokens"}, "")
    options.setdefault("pad_token_id", lm.tokenizer.pad_token_id)
    alone, _ = merge([graph])  # every node gets a window: the job never sees the batch
    alone = replace(alone, mode=GENERATE, options={**graph.options, GROUPS: alone.options[GROUPS]})
    model = lm.module
    options, stops = stop_rule(options, lm.tokenizer)
    rules = decode_rules(model, ids, options, stops.get("stopping_criteria"))
    return GenerateJob(key, alone, ids, mask, rows, rules,
                       graph.options.get(SEED), RunConfig(limits, can_stop=False), on_step)


def decode_batch(lm: LanguageModel, observe: StepObserver | None = None,
                 prefill_tokens: int | None = None) -> DecodeBatch:
    """An empty continuous batch over `lm`'s model; `prefill_tokens`: the most padded prompt
    tokens that join it in one step (None: all that wait)."""
    if lm._sizes is None:
        object.__setattr__(lm, "_sizes", model_sizes(lm.module))
    return DecodeBatch(lm.module, lm.tokenizer.pad_token_id, lm._sizes, observe, prefill_tokens)
