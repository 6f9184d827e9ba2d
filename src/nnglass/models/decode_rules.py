"""One generate job's decoding rules, as transformers' `generate` applies them: its
logits processors, its stopping criteria, greedy or sampled, the padding of finished rows.

A job in the continuous batch (runtime/decode_batch.py) picks its next tokens with these
rules on its own rows, its own ids (the left-padded layout it has alone) and its own
`torch.Generator`, so its tokens are the ones `model.generate` picks for it alone.

Invariants:
- The rules are built by transformers' own helpers from the same options the lone path
  passes to `generate` (`LanguageModel._run_generate`): the model's generation config
  under the job's options; nothing here re-implements a processor.
- Sampling draws from the job's generator only, one `multinomial` over its rows a step:
  the draws `generate` makes from the process RNG seeded with the same seed.
- Jobs whose rules act alike this step pick together (`group`, `choose_many`:
  models/decode_groups.py), each row getting what `choose` gives it alone (bit for bit,
  also where a group applies the two minimum-length processors' EOS mask itself).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode_groups import choose_group, group_key, key_template


@dataclass
class DecodeRules:
    processors: Any  # transformers LogitsProcessorList
    stopping: Any  # transformers StoppingCriteriaList
    do_sample: bool
    pad: torch.Tensor | None  # what a finished row gets while the others go on
    eos_stops: bool
    _template: Any = field(default=None, repr=False, compare=False)  # of its group keys, once

    def choose(self, ids: torch.Tensor, logits: torch.Tensor, unfinished: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids with the next token of each row appended, and which rows go on.
        `logits`: the last position's, [rows, vocab]."""
        scores = self.processors(ids, logits.to(copy=True, dtype=torch.float32))
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.eos_stops and self.pad is not None:
            tokens = tokens * unfinished + self.pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        return ids, unfinished & ~self.stopping(ids, None)

    def group(self, ids: torch.Tensor) -> Hashable | None:
        """Jobs with equal keys may pick this step's tokens in one `choose_many` (None:
        this job picks alone): models/decode_groups.py."""
        if self._template is None:
            self._template = (key_template(self),)
        return group_key(self._template[0], ids)

    def choose_many(self, members: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Generator]],
                    logits: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`choose` for each (ids, unfinished, generator) of a group, their rows stacked in `logits`."""
        return choose_group(self, members, logits)


def decode_rules(model: Any, ids: torch.Tensor, options: dict[str, Any],
                 stopping: Any = None) -> DecodeRules:
    """The rules `model.generate(input_ids=ids, **options, stopping_criteria=stopping)`
    decodes by (`stopping`: the job's own criteria: models/stop_strings.py)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    defaults = model.generation_config
    has_default_max = options.get("max_length") is None and defaults.max_length is None
    has_default_min = options.get("min_length") is None and defaults.min_length is None
    config, _ = model._prepare_generation_config(None, **options)
    model._prepare_special_tokens(config, True, device=ids.device, batch_size=ids.shape[0])
    config = model._prepare_generated_length(
        generation_config=config, has_default_max_length=has_default_max,
        has_default_min_length=has_default_min, model_input_name="input_ids",
        input_ids_length=ids.shape[1], inputs_tensor=ids)
    processors = model._get_logits_processor(
        config, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
        logits_processor=LogitsProcessorList(), device=ids.device, model_kwargs={})
    stopping = model._get_stopping_criteria(config, stopping_criteria=stopping or StoppingCriteriaList())
    eos_stops = any(hasattr(c, "eos_token_id") for c in stopping)
    return DecodeRules(processors, stopping, bool(config.do_sample), config._pad_token_tensor, eos_stops)
