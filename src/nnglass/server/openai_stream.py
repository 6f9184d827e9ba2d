"""`stream=True`: an OpenAI request's answer as SSE chunks, sent while its job generates.

Invariants:
- Chunks follow the worker's steps (server/steps.py) as they come: each token that is
  final (`openai_text.Text.ready`) is one chunk with its text, its log-probs and its row
  of each read site (`nnglass.activations`), so the chunks joined are the whole answer,
  exactly. What the steps cannot give (the job ran where steps do not reach: a Ray
  actor, another frontend; a reader the bounded log left behind; values too large to
  stream) comes from the job's result once it ends, from the first token not sent: the
  same chunks, later. Never both for one token.
- In memory per stream: the tokens not sent yet (held back by a stop string that may be
  starting) and their values; the whole result only when it is read (that fallback, or
  a user graph's saved values, which exist only at the end).
- The answer ends at an end-of-sequence token or a stop string (then the stream ends at
  once; the job itself stops generating at that token: its `stop_strings` option,
  models/stop_strings.py), else when the job ends. Last
  come the finish chunk (finish_reason; `nnglass.saved` for a user graph), usage if
  asked for, and `data: [DONE]`. A failure after the response started is one `error` event.
- A client that goes away before the answer ends cancels the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import Request

from ..errors import NNglassError, RemoteError
from ..graph.results import decode_results
from .events import wait
from .jobs import Job, JobStatus
from .openai_answer import Answer, extension_json, logprobs_json, saved_json
from .openai_errors import error_body, job_error
from .openai_graph import Frontend, Plan
from .openai_request import CompletionRequest
from .openai_text import Text
from .service import Service
from .steps import Step

KEEP_ALIVE_S = 5.0


async def follow(request: Request, service: Service, key_id: str, job_id: str) -> AsyncIterator[None]:
    """Yields while the job waits or runs (every KEEP_ALIVE_S at least); returns when it
    ends. A client gone meanwhile cancels it."""
    with service.hub.listen(job_id) as changed:
        while True:
            changed.clear()
            job = await asyncio.to_thread(service.get, key_id, job_id)
            if job.status.terminal:
                return
            if await request.is_disconnected():
                await asyncio.to_thread(service.cancel, key_id, job_id)
                return
            yield None
            await wait(changed, timeout=KEEP_ALIVE_S)


def ended_job(service: Service, key_id: str, job_id: str) -> Job:
    """The ended job; raises its error if it did not complete."""
    job = service.get(key_id, job_id)
    if job.status == JobStatus.CANCELLED:
        raise RemoteError(f"job {job_id} was cancelled")
    if job.status == JobStatus.ERROR:
        raise job_error(job.error)
    return job


def job_values(service: Service, key_id: str, job_id: str) -> dict[int, Any]:
    """A completed job's saved values, from whichever result store holds them."""
    ended_job(service, key_id, job_id)
    stream, _ = service.open_result(key_id, job_id)
    try:
        return decode_results(stream.read())
    finally:
        stream.close()


class Feed:
    """Generated tokens in, each with its step's values; the chunks of the final ones out."""

    def __init__(self, req: CompletionRequest, plan: Plan, frontend: Frontend, job_id: str) -> None:
        self.req, self.plan, self.tokenizer, self.job_id = req, plan, frontend.tokenizer, job_id
        self.text = Text(frontend.tokenizer, frontend.eos, req.stop)
        self.pushed = 0  # generated tokens taken (the next one's index)
        self.sent = 0  # tokens sent
        self.chars = 0  # text sent
        self._logprobs: deque[torch.Tensor] = deque()  # per token taken and not sent
        self._reads: dict[str, deque[torch.Tensor]] = {site: deque() for site in plan.reads}

    def push_step(self, step: Step) -> bool:
        """A live step; False if it cannot be used (the result must give it)."""
        if step.step != self.pushed or len(step.tokens) != 1 or len(step.tokens[0]) != 1:
            return False
        logprobs, reads = None, {}
        if self.plan.logprobs is not None or self.plan.reads:
            if step.dropped:
                return False
            values = step.values()
            nodes = dict(self.plan.reads)
            if self.plan.logprobs is not None:
                nodes[""] = self.plan.logprobs
            entries = {site: values.get(node) for site, node in nodes.items()}
            if not all(isinstance(e, list) and len(e) == 1 for e in entries.values()):
                return False  # (a site called twice in a step: the result's rows, as the whole answer's)
            logprobs = entries.pop("")[0][0] if "" in entries else None
            reads = {site: e[0] for site, e in entries.items()}
        self._push(int(step.tokens[0][0]), logprobs, reads)
        return True

    def push_result(self, values: dict[int, Any]) -> None:
        """The rest of the tokens, from the job's result."""
        generated = values[self.plan.result][0, self.plan.prompt_len :].tolist()
        lp = None if self.plan.logprobs is None else values[self.plan.logprobs]
        for k in range(self.pushed, len(generated)):
            if self.text.over:
                return
            self._push(int(generated[k]), None if lp is None else lp[k][0],
                       {site: values[node][k] for site, node in self.plan.reads.items()})

    def _push(self, token: int, logprobs: torch.Tensor | None, reads: dict[str, torch.Tensor]) -> None:
        self.pushed += 1
        if self.text.over:
            return
        self.text.push(token)
        if logprobs is not None:
            self._logprobs.append(logprobs)
        for site, row in reads.items():
            self._reads[site].append(row)

    def chunks(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(choice, nnglass) of each token that became final since the last call."""
        out = []
        for i in range(self.sent, self.text.ready()):
            piece = self.text.piece(i)
            lp = [self._logprobs.popleft()] if self.plan.logprobs is not None else None
            one = Answer([self.text.tokens[i]], [piece], "", 0, lp,
                         {site: [rows.popleft()] for site, rows in self._reads.items()}, {})
            body = {"delta": {"content": piece}} if self.req.chat else {"text": piece}
            logprobs = logprobs_json(self.req, one, self.tokenizer, 0, 1, self.chars)
            choice = {**body, "logprobs": logprobs, "finish_reason": None}
            out.append((choice, extension_json(one, self.job_id, 0, 1)))
            self.chars += len(piece)
            self.sent += 1
        return out


async def stream_answer(request: Request, service: Service, frontend: Frontend, req: CompletionRequest,
                        job: Job, plan: Plan, head: dict[str, Any]) -> AsyncIterator[str]:
    key_id = request.state.key_id

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        data = {**head, "choices": [] if choice is None else [{"index": 0, **choice}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    if req.chat:
        yield chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
                    nnglass={"job": job.id})
    feed, answered = Feed(req, plan, frontend, job.id), False
    try:  # a stream closed early (the client went away) cancels the job
        live = False  # every step came live, and no more will
        with service.hub.listen(job.id, steps=True) as changed:
            while not live:
                changed.clear()  # before reading: a step after the read wakes the wait
                got = service.steps.read(job.id, feed.pushed - 1)
                usable = not got.gap and all(feed.push_step(s) for s in got.steps if not feed.text.over)
                for choice, ext in feed.chunks():
                    yield chunk(choice, nnglass=ext)
                if not usable:
                    break  # the rest from the result
                live = feed.text.over or (got.ended and not got.steps)
                if live or got.steps:
                    continue
                if (await asyncio.to_thread(service.get, key_id, job.id)).status.terminal:
                    break  # it ran where no steps reach us: the rest from the result
                if await request.is_disconnected():
                    return
                yield ": waiting\n\n"
                await wait(changed, timeout=KEEP_ALIVE_S)
        saved = None
        if not feed.text.over or plan.saved:
            async for _ in follow(request, service, key_id, job.id):
                yield ": waiting\n\n"
            if live and not plan.saved:
                await asyncio.to_thread(ended_job, service, key_id, job.id)
            else:
                values = await asyncio.to_thread(job_values, service, key_id, job.id)
                feed.push_result(values)
                saved = saved_json(plan, values) if plan.saved else None
                del values
        feed.text.end()
        for choice, ext in feed.chunks():
            yield chunk(choice, nnglass=ext)
        answered = True
        end = {"delta": {}} if req.chat else {"text": ""}
        ext = {"job": job.id, **({"saved": saved} if saved else {})}
        yield chunk({**end, "logprobs": None, "finish_reason": feed.text.finish}, nnglass=ext)
        if req.include_usage:
            n = feed.text.ready()
            yield chunk(None, usage={"prompt_tokens": plan.prompt_len, "completion_tokens": n,
                                     "total_tokens": plan.prompt_len + n})
        yield "data: [DONE]\n\n"
    except NNglassError as e:
        answered = True
        yield f"data: {json.dumps(error_body(e)[1])}\n\n"
    finally:
        service.steps.discard(job.id)
        if not answered:
            with contextlib.suppress(NNglassError):
                service.cancel(key_id, job.id)
