"""OpenAI-compatible endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, and the
OpenAI shape of `GET /v1/models` (docs/providers.md).

Invariants:
- A request is an ordinary job: its graph (server/openai_graph.py) goes through
  `Service.submit` (policy, limits, quota, scheduling, persistence, dashboard, metrics),
  and the answer is read from the job's stored result. Nothing here runs a model.
- Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with one
  status per nnglass error class (`OPENAI_STATUS`), on these paths only (the Guard's
  401/413 included); every other path keeps nnglass's own shape.
- Streaming (openai_stream.py): the response starts once the job is accepted; SSE
  comments keep the connection open while it waits; each token is a chunk (text,
  log-probs, its activations) as soon as the worker's step makes it final.
- A client that goes away before its answer cancels the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import MalformedError, NNglassError, RemoteError, TooLargeError
from .arrivals import closing
from .jobs import Job
from .openai_answer import Answer, extension_json, logprobs_json, make_answer, usage
from .openai_errors import OPENAI_STATUS as OPENAI_STATUS
from .openai_errors import openai_error
from .openai_graph import Frontend, Frontends, Plan
from .openai_request import CompletionRequest, parse_request
from .openai_stream import follow, job_values, stream_answer
from .service import Service

log = logging.getLogger(__name__)
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

def models_page(entries: list[dict[str, Any]], request: Request) -> Any:
    """`GET /v1/models`: every entry also has OpenAI's `id`, `object`, `created`, `owned_by`;
    an OpenAI SDK (it sends `X-Stainless-Lang`) or `?format=openai` gets OpenAI's list
    object `{"object": "list", "data": [...]}`, anyone else nnglass's plain list."""
    for entry in entries:
        entry.update(id=entry["name"], object="model", created=0, owned_by="nnglass")
    if request.headers.get("x-stainless-lang") or request.query_params.get("format") == "openai":
        return {"object": "list", "data": entries}
    return entries


def add_openai(app: FastAPI, service: Service, frontends: Frontends) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, service, frontends, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, service, frontends, chat=True)


async def _complete(request: Request, service: Service, frontends: Frontends, chat: bool) -> Any:
    try:
        try:
            body = await _read_json(request, service.config.max_request_bytes)
            req = parse_request(body, chat)
            arrived = request.state.arrived
            submit = closing(arrived, _submit)  # closed once queued (`arrived`), or refused
            frontend, job, plan = await asyncio.to_thread(submit, service, frontends, req,
                                                          request.state.key_id, arrived)
        finally:  # queued or refused: a pass due now waits no more for it (arrivals.py)
            request.state.arrived()
    except NNglassError as e:
        return openai_error(e)
    except Exception as e:  # a bug of ours, not the client's: logged, answered in OpenAI's shape
        log.exception("could not make the graph of a %s request", "chat" if chat else "completion")
        return openai_error(RemoteError(f"the server could not make the request's graph: {type(e).__name__}"))
    key_id = request.state.key_id
    created = int(time.time())
    if req.stream:
        head = {"id": _id(req, job.id), "object": "chat.completion.chunk" if req.chat else "text_completion",
                "created": created, "model": req.model, "system_fingerprint": None}
        return StreamingResponse(
            stream_answer(request, service, frontend, req, job, plan, head),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )
    try:
        async for _ in follow(request, service, key_id, job.id):
            pass
        answer = await asyncio.to_thread(_answer, service, frontend, req, key_id, job.id, plan)
    except NNglassError as e:
        return openai_error(e)
    return _whole(req, frontend, answer, job.id, created)


def _submit(service: Service, frontends: Frontends, req: CompletionRequest, key_id: str,
            queued: Callable[[], None]) -> tuple[Frontend, Job, Plan]:
    """In a worker thread: a model's first request loads its tokenizer and config.
    `queued()` once the queue has the job (Service.submit)."""
    frontend = frontends.get(req.model)
    limit = service.config.model(req.model).policy.limits.new_tokens  # type: ignore[union-attr]
    if req.max_tokens is not None and req.max_tokens > limit:
        raise MalformedError(f"max_tokens: at most {limit} on model {req.model!r}, got {req.max_tokens}")
    ids = frontend.prompt_ids(req)
    graph_json, tensors, plan = frontend.build(req, ids, req.max_tokens or limit)
    return frontend, service.submit(key_id, graph_json, tensors, queued), plan


async def _read_json(request: Request, limit: int) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"request body over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedError(f"the body is not JSON: {e}") from None


def _answer(service: Service, frontend: Frontend, req: CompletionRequest, key_id: str, job_id: str,
            plan: Plan) -> Answer:
    return make_answer(req, plan, job_values(service, key_id, job_id), frontend.tokenizer, frontend.eos)


def _whole(req: CompletionRequest, frontend: Frontend, answer: Answer, job_id: str, created: int) -> dict:
    n = len(answer.tokens)
    logprobs = logprobs_json(req, answer, frontend.tokenizer, 0, n)
    if req.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.text, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": answer.finish_reason,
        }
    else:
        choice = {
            "index": 0,
            "text": answer.text,
            "logprobs": logprobs,
            "finish_reason": answer.finish_reason,
        }
    return {"id": _id(req, job_id), "object": "chat.completion" if req.chat else "text_completion",
            "created": created, "model": req.model, "system_fingerprint": None, "choices": [choice],
            "usage": usage(answer), "nnglass": extension_json(answer, job_id, 0, n)}


def _id(req: CompletionRequest, job_id: str) -> str:
    return f"{'chatcmpl' if req.chat else 'cmpl'}-{job_id}"
