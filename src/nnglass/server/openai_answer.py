"""A finished job's saved values as an OpenAI answer: text, per-token pieces, log-probs,
activations, usage; whole (one response) or token by token (stream chunks).

Invariants:
- The text, where it ends and why come from `openai_text.Text`, the same code a stream
  uses token by token (openai_stream.py), so a stream's pieces joined are this text.
- Tokens dropped by the end (an end-of-sequence token, a stop string) are dropped from
  the text, the log-probs, the activations and the usage count alike.
- Log-probabilities are the model's own (log-softmax of the logits, before temperature
  or top_p), in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .openai_graph import Plan, encode_array
from .openai_request import CompletionRequest
from .openai_text import Text


@dataclass
class Answer:
    tokens: list[int]
    pieces: list[str]  # one text piece per kept token
    finish_reason: str
    prompt_tokens: int
    logprobs: list[torch.Tensor] | None  # per kept token: the log-softmax over the vocabulary
    reads: dict[str, list[torch.Tensor]]  # site -> per kept token, its [1, features] row
    saved: dict[str, Any]  # the user's graph's saved values (JSON)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def make_answer(req: CompletionRequest, plan: Plan, values: dict[int, Any], tokenizer: Any,
                eos: set[int]) -> Answer:
    text = Text(tokenizer, eos, req.stop)
    for t in values[plan.result][0, plan.prompt_len :].tolist():
        text.push(int(t))
        if text.over:
            break
    text.end()
    n = text.ready()
    logprobs = None if plan.logprobs is None else [step[0] for step in values[plan.logprobs][:n]]
    reads = {site: list(values[node][:n]) for site, node in plan.reads.items()}
    pieces = [text.piece(i) for i in range(n)]
    return Answer(text.tokens[:n], pieces, text.finish or "length", plan.prompt_len, logprobs, reads,
                  saved_json(plan, values))


def saved_json(plan: Plan, values: dict[int, Any]) -> dict[str, Any]:
    """The user's graph's saved values, by its own node ids, as JSON."""
    return {str(uid): _json(values.get(our)) for uid, our in plan.saved.items()}


def _json(value: Any) -> Any:
    """A saved value as JSON: tensors as `encode_array`, containers item by item."""
    if isinstance(value, torch.Tensor):
        return encode_array(value)
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# --- OpenAI's shapes ------------------------------------------------------------------------


def usage(answer: Answer) -> dict[str, int]:
    n = len(answer.tokens)
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": answer.prompt_tokens + n,
    }


def logprobs_json(req: CompletionRequest, answer: Answer, tokenizer: Any, start: int, stop: int,
                  chars_before: int = 0) -> Any:
    """Tokens start..stop-1's log-probs, as chat (`content`) or completions (`tokens`, ...) want;
    `chars_before`: the text before `answer`'s first token (a stream's chunk: what was sent)."""
    if answer.logprobs is None:
        return None
    k = req.top_logprobs or 0
    entries = []
    for i in range(start, stop):
        lp, token = answer.logprobs[i], answer.tokens[i]
        top = torch.topk(lp, k) if k else None
        alternatives = [] if top is None else [(int(j), float(v)) for v, j in zip(top.values, top.indices)]
        entries.append((tokenizer.decode([token]), float(lp[token]),
                        [(tokenizer.decode([j]), v) for j, v in alternatives]))
    if req.chat:
        return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": w, "bytes": list(a.encode())}
                                              for a, w in alts]}
                            for t, v, alts in entries], "refusal": None}
    offset = chars_before + sum(len(p) for p in answer.pieces[:start])
    offsets = []
    for i in range(start, stop):
        offsets.append(offset)
        offset += len(answer.pieces[i])
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [v for _, v, _ in entries],
        "top_logprobs": [{a: w for a, w in alts} for _, _, alts in entries],
        "text_offset": offsets,
    }


def extension_json(answer: Answer, job_id: str, start: int, stop: int) -> dict[str, Any]:
    """The `nnglass` field: the job, and tokens start..stop-1's activations per read site."""
    out: dict[str, Any] = {"job": job_id}
    if answer.reads:
        rows = {site: values[start:stop] for site, values in answer.reads.items()}
        out["activations"] = {s: encode_array(torch.cat(r) if r else torch.empty(0)) for s, r in rows.items()}
    if answer.saved and start == 0:
        out["saved"] = answer.saved
    return out
