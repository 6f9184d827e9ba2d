"""Several generate jobs pick their next tokens in one call: the step's token pick of a
continuous batch (runtime/decode_batch.py) done once per group of jobs with the same
rules, instead of once per job (per job, a pick is a dozen small tensor operations, which
at 32 jobs cost a fifth of a decode step and far more on a busy machine).

A group is the jobs whose `group_key` is equal this step. Each job keeps its own ids, its
own unfinished rows and its own `torch.Generator`; the group shares only the calls of
transformers' own processors and stopping criteria (models/decode_rules.py builds them).

Invariants:
- Only processors and criteria whose effect on a row depends on nothing but that row's
  scores, its last token, or the length of the ids join a group (a whitelist, below);
  their parameters are part of the key (worked out once per job: `key_template`), and
  for a length-dependent one so is what the length decides now (is the minimum reached,
  is the maximum). A job with anything else
  (a repetition penalty reads its ids, stop strings read its text, a custom processor)
  has no key and picks alone, by `DecodeRules.choose`.
- Called on the group's rows, the processors see the ids of the key's first job (its
  length; its content is read by none of them), so every row gets what its own job's
  call gives it: the same scores, the same argmax; a sampling job draws from its own
  generator over its own rows, one `multinomial` a step, as alone.
- The two length processors (a minimum length, a minimum of new tokens) are applied as
  what they compute: while the minimum is not reached, EOS's scores become -inf, the
  others stay (their `torch.where` over an EOS mask, bit for bit); once it is, nothing.
  That is one in-place fill of the group's own copy of the scores, instead of a clone,
  a mask and a `where` over [rows, vocab] each, every step. Every other processor is
  transformers' own call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .decode_rules import DecodeRules

# Processors whose output row is a function of that row's scores alone (and their fields).
_SCORES_ONLY = frozenset({"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                          "MinPLogitsWarper"})
_INDEX_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _frozen(x: Any) -> Hashable:
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.reshape(-1).tolist()))
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    raise TypeError(type(x).__name__)


LengthRule = Callable[[int], bool]  # what the ids' length decides for one processor or criterion
KeyTemplate = tuple[Hashable, tuple[LengthRule, ...]]  # a key's fixed part, and its length rules


def _processor_part(p: Any) -> tuple[Hashable, LengthRule | None] | None:
    name = type(p).__name__
    if name == "MinNewTokensLengthLogitsProcessor":
        skip, least = p.prompt_length_to_skip, p.min_new_tokens
        return (name, _frozen(p.eos_token_id)), lambda n: n - skip < least
    if name == "MinLengthLogitsProcessor":
        least = p.min_length
        return (name, _frozen(p.eos_token_id)), lambda n: n < least
    if name in _SCORES_ONLY:
        try:
            return (name, tuple(sorted((k, _frozen(v)) for k, v in vars(p).items()))), None
        except TypeError:
            return None
    return None


def _criterion_part(c: Any) -> tuple[Hashable, LengthRule | None] | None:
    name = type(c).__name__
    if name == "MaxLengthCriteria":  # checked on the ids with the new token
        most = c.max_length
        return name, lambda n: n + 1 >= most
    if name == "EosTokenCriteria":  # reads the new token only
        return (name, _frozen(c.eos_token_id)), None
    return None


def key_template(rules: DecodeRules) -> KeyTemplate | None:
    """What `group_key` is made of, worked out once per job: the rules' kinds and fields (which
    never change), and the rules whose effect the ids' length decides. None: picks alone."""
    if type(rules.processors).__name__ != "LogitsProcessorList":
        return None
    if type(rules.stopping).__name__ != "StoppingCriteriaList":
        return None
    fixed: list[Hashable] = [rules.do_sample, rules.eos_stops, _frozen(rules.pad)]
    lengths: list[LengthRule] = []
    parts = [*map(_processor_part, rules.processors), "stopping", *map(_criterion_part, rules.stopping)]
    for part in parts:
        if part is None:
            return None
        if part == "stopping":
            fixed.append(part)
            continue
        key, rule = part
        fixed.append(key)
        if rule is not None:
            lengths.append(rule)
    return tuple(fixed), tuple(lengths)


def group_key(template: KeyTemplate | None, ids: torch.Tensor) -> Hashable | None:
    """Jobs whose keys are equal (not None) can pick this step's tokens in one call: the same
    rules, on the same kind of device, and the same decisions of their length rules now."""
    if template is None:
        return None
    fixed, lengths = template
    n = ids.shape[1]
    return fixed, ids.device.type, tuple(rule(n) for rule in lengths)


def choose_group(rules: DecodeRules, members: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Generator]],
                 logits: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each member's (ids, unfinished) after this step, as `rules.choose` gives it alone.
    `rules`: the first member's; `members`: (ids, unfinished, generator) per job, in the
    order of their rows in `logits` ([sum of rows, vocab], the last position's)."""
    first = members[0][0]
    stand_in = first[:1].expand(logits.shape[0], first.shape[1])  # the length the key fixed
    scores = _processed(rules, stand_in, logits.to(copy=True, dtype=torch.float32))
    sizes = [ids.shape[0] for ids, _, _ in members]
    if rules.do_sample:
        probs = torch.nn.functional.softmax(scores, dim=-1)
        tokens = torch.cat([torch.multinomial(p, num_samples=1, generator=g).squeeze(1)
                            for p, (_, _, g) in zip(probs.split(sizes), members)])
    else:
        tokens = torch.argmax(scores, dim=-1)
    unfinished = torch.cat([u for _, u, _ in members])
    if rules.eos_stops and rules.pad is not None:
        tokens = tokens * unfinished + rules.pad * (1 - unfinished)
    after = torch.cat([stand_in, tokens[:, None]], dim=-1)
    going = unfinished & ~rules.stopping(after, None)
    return [(torch.cat([ids, t[:, None]], dim=-1), u)
            for (ids, _, _), t, u in zip(members, tokens.split(sizes), going.split(sizes))]


def _processed(rules: DecodeRules, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`rules.processors(ids, scores)` (the whitelisted ones, in their order); `scores`: the
    group's own copy, which the length processors' EOS mask fills in place."""
    length, vocab = ids.shape[1], scores.shape[-1]
    for p in rules.processors:
        eos = _eos_mask(p, length, vocab)
        if eos is None:
            scores = p(ids, scores)  # LogitsProcessorList's own call of a two-argument processor
        elif eos.numel():
            scores.index_fill_(-1, eos.to(scores.device), -math.inf)
    return scores


def _eos_mask(p: Any, length: int, vocab: int) -> torch.Tensor | None:
    """A length processor's EOS ids to mask at this length (empty: its minimum is reached);
    None: call the processor itself (another kind, or ids that are not plain vocabulary
    indices, whose `isin` mask an index fill would not give)."""
    name = type(p).__name__
    if name == "MinNewTokensLengthLogitsProcessor":
        active = length - p.prompt_length_to_skip < p.min_new_tokens
    elif name == "MinLengthLogitsProcessor":
        active = length < p.min_length
    else:
        return None
    eos = p.eos_token_id
    if not isinstance(eos, torch.Tensor) or eos.dtype not in _INDEX_DTYPES or eos.dim() > 1:
        return None
    eos = eos.reshape(-1)
    if not active:
        return eos[:0]
    if not all(0 <= i < vocab for i in eos.tolist()):
        return None
    return eos
