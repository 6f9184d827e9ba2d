"""The prompt layout of a language model's graph, checked before anything reads it.

Invariant: a trace or generation graph for a `LanguageModel` that `check_prompts`
accepts has at least one invoke; each invoke has no positional arguments and exactly the
keyword arguments `input_ids` and `attention_mask`, both attached tensors of one 2-D
shape (at least one row and one token), the ids integers, the mask integers or booleans;
and its `forward`/`generate` options, when present, are dicts. `batch_prompts` (local
runs and the worker) and the server's `Service.submit` (a 422, not a failed job) both
call it, so no code past it meets a missing key or a wrong type. `batch_prompts` then
left-pads every invoke to one width; `check_generate_kwargs` admits the generate options
whose step semantics hold (one sequence per prompt).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import GraphError, TraceError
from ..graph.ir import Graph, TensorRef
from .stop_strings import STOP_STRINGS, check_stop_strings

PROMPT_KEYS = ("input_ids", "attention_mask")
_IDS = (torch.int64, torch.int32)
_MASK = (torch.int64, torch.int32, torch.bool)


def _tensor(graph: Graph, value: Any, what: str) -> torch.Tensor:
    if type(value) is not TensorRef or value.key not in graph.tensors:
        raise GraphError(f"{what} must be an attached tensor, got {type(value).__name__}")
    return graph.tensors[value.key]


def check_prompts(graph: Graph) -> None:
    """Raise GraphError naming the invoke and the problem unless the layout above holds."""
    for table in ("forward", "generate"):
        if type(graph.options.get(table, {})) is not dict:
            raise GraphError(f"option {table!r} must be a dict of keyword arguments, "
                             f"got {type(graph.options[table]).__name__}")
    if not graph.invokes:
        raise GraphError("a language model's graph needs at least one invoke (a prompt)")
    for i, inv in enumerate(graph.invokes):
        if inv.args or sorted(inv.kwargs) != sorted(PROMPT_KEYS):
            raise GraphError(f"invoke {i}: a prompt is exactly the keyword arguments input_ids and "
                             f"attention_mask, got {len(inv.args)} positional and {sorted(inv.kwargs)[:4]}")
        ids = _tensor(graph, inv.kwargs["input_ids"], f"invoke {i}: input_ids")
        mask = _tensor(graph, inv.kwargs["attention_mask"], f"invoke {i}: attention_mask")
        if ids.dim() != 2 or 0 in ids.shape or ids.dtype not in _IDS:
            raise GraphError(f"invoke {i}: input_ids must be a 2-D integer tensor with at least one "
                             f"token, got {ids.dtype} {list(ids.shape)}")
        if mask.shape != ids.shape or mask.dtype not in _MASK:
            raise GraphError(f"invoke {i}: attention_mask must be integers or booleans of the ids' shape "
                             f"{list(ids.shape)}, got {mask.dtype} {list(mask.shape)}")


def batch_prompts(graph: Graph, pad_id: int, width: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Left-pad every invoke's ids to the longest (or `width`, if wider); return ids, mask
    and each invoke's rows."""
    check_prompts(graph)
    parts = [(graph.tensors[inv.kwargs["input_ids"].key], graph.tensors[inv.kwargs["attention_mask"].key])
             for inv in graph.invokes]
    width = max(width or 0, *(ids.shape[1] for ids, _ in parts))
    all_ids, all_mask, rows, start = [], [], [], 0
    for ids, mask in parts:
        pad = width - ids.shape[1]
        all_ids.append(torch.nn.functional.pad(ids, (pad, 0), value=pad_id))
        all_mask.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
        rows.append((start, start + ids.shape[0]))
        start += ids.shape[0]
    return torch.cat(all_ids), torch.cat(all_mask), rows


def batch_prompts_width(graph: Graph) -> int:
    return max(graph.tensors[inv.kwargs["input_ids"].key].shape[1] for inv in graph.invokes)


# One sequence per prompt, sampled or greedy: what the step semantics (docs/reference.md) cover.
# Beam search and several sequences per prompt change the batch under the graph's rows.
GENERATE_OPTIONS = frozenset(
    "do_sample temperature top_k top_p min_p typical_p repetition_penalty no_repeat_ngram_size "
    "min_new_tokens eos_token_id suppress_tokens bad_words_ids stop_strings".split()
)


def check_generate_kwargs(kwargs: dict[str, Any], where: str) -> None:
    unknown = sorted(set(kwargs) - GENERATE_OPTIONS)
    if unknown:
        raise TraceError(f"generate option(s) {', '.join(unknown)} are not supported; use "
                         f"{', '.join(sorted(GENERATE_OPTIONS))}", where)
    if STOP_STRINGS in kwargs:
        check_stop_strings(kwargs[STOP_STRINGS], where)
