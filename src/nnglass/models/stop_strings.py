"""Stop strings as a generation's own stopping rule (the generate option `stop_strings`):
a row stops generating at the step where its text is over by an OpenAI answer's rule
(server/openai_text.Text: the first stop string, once no other can still start before
it), so a generation asked to stop at a string spends no steps past it.

The rule is one transformers `StoppingCriteria`, given to `generate` on the lone path
(`LanguageModel._run_generate`) and to the continuous batch's decoding rules
(models/decode_rules.py), so a job stops at the same token either way.

Invariants:
- A row stops exactly when `Text` over its generated tokens is over, never before: the
  text of the shortened generation, cut by `Text`, is the text of the whole one. (End-of-
  sequence ids are left to generate's own criteria: `Text` here knows none, so it can
  only be over later than the answer's own `Text`, never earlier.)
- Bounded: at most MAX_STOPS strings of 1..MAX_STOP_CHARS characters (a job's options are
  a client's input); a row's state is its own tokens and text.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError
from ..server.openai_text import Text  # (plain text logic: no server state)

STOP_STRINGS = "stop_strings"
MAX_STOPS, MAX_STOP_CHARS = 4, 256


def check_stop_strings(value: Any, where: str = "") -> tuple[str, ...]:
    """The stop strings of a generate option's value; TraceError naming it if malformed."""
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list | tuple) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise TraceError(f"{STOP_STRINGS}: a string or a list of at most {MAX_STOPS} strings of 1 to "
                         f"{MAX_STOP_CHARS} characters", where)
    return tuple(stops)


def stop_rule(options: dict[str, Any], tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`options` without `stop_strings`, and what `generate` gets for it instead: {} or
    {"stopping_criteria": a StoppingCriteriaList of the rule}."""
    if STOP_STRINGS not in options:
        return options, {}
    from transformers import StoppingCriteriaList

    rest = {k: v for k, v in options.items() if k != STOP_STRINGS}
    stops = check_stop_strings(options[STOP_STRINGS])
    return rest, {"stopping_criteria": StoppingCriteriaList([_criterion(tokenizer, stops)])} if stops else {}


def _criterion(tokenizer: Any, stops: tuple[str, ...]) -> Any:
    from transformers import StoppingCriteria

    class StopAtStrings(StoppingCriteria):
        """Called once a step with every row's ids (prompt + tokens so far): which rows are over."""

        def __init__(self) -> None:
            self.texts: list[Text] = []
            self.start = self.pushed = 0  # where the generated tokens begin; how many were pushed

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if not self.texts:  # the first call: one token after the prompt
                self.start, self.pushed = input_ids.shape[1] - 1, 0
                self.texts = [Text(tokenizer, set(), stops) for _ in range(input_ids.shape[0])]
            new = input_ids[:, self.start + self.pushed:].tolist()
            for text, tokens in zip(self.texts, new):
                for token in tokens:
                    text.push(token)  # (a no-op once over)
            self.pushed += len(new[0]) if new else 0
            return torch.tensor([t.over for t in self.texts], dtype=torch.bool, device=input_ids.device)

    return StopAtStrings()
