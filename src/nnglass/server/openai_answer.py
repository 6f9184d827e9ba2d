"""A finished job's saved values as an OpenAI answer: text, per-token pieces, log-probs,
activations, usage; whole (one response) or token by token (stream chunks).

Invariants:
- The streamed pieces joined are the whole answer's text, exactly: both come from one
  `Answer`, the pieces cut from the same decoded text (a token that ends inside a UTF-8
  character adds nothing until the character is complete).
- Generation ends at the first end-of-sequence token (kept out of the text) or the first
  stop string (cut before it); tokens after the cut are dropped from the text, the
  log-probs, the activations and the usage count alike. finish_reason is "stop" then,
  else "length".
- Log-probabilities are the model's own (log-softmax of the logits, before temperature
  or top_p), in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .openai_graph import Plan, encode_array
from .openai_request import CompletionRequest


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
    result = values[plan.result]
    generated = [int(t) for t in result[0, plan.prompt_len :].tolist()]
    finish = "length"
    for i, t in enumerate(generated):
        if t in eos:
            generated, finish = generated[:i], "stop"
            break
    pieces, text = [], ""
    for i in range(len(generated)):
        full = tokenizer.decode(generated[: i + 1], skip_special_tokens=True)
        if full.endswith("\ufffd") and i + 1 < len(generated):
            pieces.append("")  # a character split across tokens: wait for its end
            continue
        pieces.append(full[len(text) :] if full.startswith(text) else "")
        text += pieces[-1]
    cut = _first_stop(text, req.stop)
    if cut is not None:
        finish, kept, total = "stop", [], 0
        for piece in pieces:
            if total >= cut:
                break
            kept.append(piece[: cut - total])
            total += len(piece)
        pieces = kept
        generated = generated[: len(pieces)]
    n = len(generated)
    logprobs = None if plan.logprobs is None else [step[0] for step in values[plan.logprobs][:n]]
    reads = {site: list(values[node][:n]) for site, node in plan.reads.items()}
    saved = {str(uid): _json(values.get(our)) for uid, our in plan.saved.items()}
    return Answer(generated, pieces, finish, plan.prompt_len, logprobs, reads, saved)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


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


def logprobs_json(req: CompletionRequest, answer: Answer, tokenizer: Any, start: int, stop: int) -> Any:
    """Tokens start..stop-1's log-probs, as chat (`content`) or completions (`tokens`, ...) want."""
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
    offset = sum(len(p) for p in answer.pieces[:start])
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
