"""OpenAI-compatible endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, and the
OpenAI shape of `GET /v1/models` (docs/providers.md).

Invariants:
- A request is an ordinary job: its graph (server/openai_graph.py) goes through
  `Service.submit` (policy, limits, quota, scheduling, persistence, dashboard, metrics),
  and the answer is read from the job's stored result. Nothing here runs a model.
- Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with one
  status per nnglass error class (`OPENAI_STATUS`), on these paths only (the Guard's
  401/413 included); every other path keeps nnglass's own shape.
- Streaming: the response starts once the job is accepted; while it waits and runs, SSE
  comments keep the connection open; when it ends, one chunk per token follows (text,
  log-probs and the token's activations), then the finish chunk, the usage chunk if asked
  for, and `data: [DONE]`. Tokens are not sent while the job runs (the worker answers a
  job once, when it ends); a failure after the response started is one `error` event.
- A client that goes away before its answer cancels the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import (
    AuthError,
    ExecutionError,
    GraphError,
    MalformedError,
    NNglassError,
    NotFoundError,
    OutOfOrderError,
    PolicyError,
    QuotaError,
    RemoteError,
    ResourceLimitError,
    TimeLimitError,
    TooLargeError,
    TraceError,
    UnavailableError,
)
from ..graph.results import decode_results
from .events import wait
from .jobs import Job, JobStatus
from .openai_answer import Answer, extension_json, logprobs_json, make_answer, usage
from .openai_graph import Frontend, Frontends, Plan
from .openai_request import CompletionRequest, parse_request
from .service import Service

log = logging.getLogger(__name__)
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
KEEP_ALIVE_S = 5.0

# Most specific first. (status, OpenAI error type, code)
OPENAI_STATUS: list[tuple[type[NNglassError], int, str, str]] = [
    (MalformedError, 400, "invalid_request_error", "invalid_value"),
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (NotFoundError, 404, "invalid_request_error", "model_not_found"),
    (PolicyError, 403, "permission_error", "policy_forbidden"),
    (TooLargeError, 413, "invalid_request_error", "request_too_large"),
    (QuotaError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (UnavailableError, 503, "server_error", "unavailable"),
    (RemoteError, 500, "server_error", "job_failed"),
    (GraphError, 400, "invalid_request_error", "invalid_graph"),
    (NNglassError, 400, "invalid_request_error", "invalid_request"),
]


def openai_error(e: NNglassError) -> JSONResponse:
    status, body = _error_body(e)
    headers = {"Retry-After": "2"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _error_body(e: NNglassError) -> tuple[int, dict[str, Any]]:
    status, kind, code = next((s, k, c) for cls, s, k, c in OPENAI_STATUS if isinstance(e, cls))
    message = f"{e.message} (at {e.where})" if e.where else e.message
    head = e.message.split(":", 1)[0]
    param = head if isinstance(e, MalformedError) and " " not in head else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _job_error(error: dict[str, Any] | None) -> NNglassError:
    """A failed job's stored error as the nnglass class it names (unknown: RemoteError, 500)."""
    error = error or {}
    cls = _JOB_ERRORS.get(str(error.get("type")), RemoteError)
    return cls(str(error.get("message") or "the job failed"), str(error.get("where") or ""))


_JOB_ERRORS: dict[str, type[NNglassError]] = {c.__name__: c for c in (
    PolicyError, GraphError, MalformedError, TraceError, ExecutionError, TimeLimitError, ResourceLimitError,
    OutOfOrderError)}


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
        body = await _read_json(request, service.config.max_request_bytes)
        req = parse_request(body, chat)
        frontend, job, plan = await asyncio.to_thread(_submit, service, frontends, req, request.state.key_id)
    except NNglassError as e:
        return openai_error(e)
    except Exception as e:  # a bug of ours, not the client's: logged, answered in OpenAI's shape
        log.exception("could not make the graph of a %s request", "chat" if chat else "completion")
        return openai_error(RemoteError(f"the server could not make the request's graph: {type(e).__name__}"))
    key_id = request.state.key_id
    created = int(time.time())
    if req.stream:
        return StreamingResponse(
            _stream(request, service, frontend, req, job, plan, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )
    try:
        async for _ in _follow(request, service, key_id, job.id):
            pass
        answer = await asyncio.to_thread(_answer, service, frontend, req, key_id, job.id, plan)
    except NNglassError as e:
        return openai_error(e)
    return _whole(req, frontend, answer, job.id, created)


def _submit(service: Service, frontends: Frontends, req: CompletionRequest,
            key_id: str) -> tuple[Frontend, Job, Plan]:
    """In a worker thread: a model's first request loads its tokenizer and config."""
    frontend = frontends.get(req.model)
    limit = service.config.model(req.model).policy.limits.new_tokens  # type: ignore[union-attr]
    if req.max_tokens is not None and req.max_tokens > limit:
        raise MalformedError(f"max_tokens: at most {limit} on model {req.model!r}, got {req.max_tokens}")
    ids = frontend.prompt_ids(req)
    graph_json, tensors, plan = frontend.build(req, ids, req.max_tokens or limit)
    return frontend, service.submit(key_id, graph_json, tensors), plan


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


async def _follow(request: Request, service: Service, key_id: str, job_id: str) -> AsyncIterator[None]:
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


def _answer(service: Service, frontend: Frontend, req: CompletionRequest, key_id: str, job_id: str,
            plan: Plan) -> Answer:
    job = service.get(key_id, job_id)
    if job.status == JobStatus.CANCELLED:
        raise RemoteError(f"job {job_id} was cancelled")
    if job.status == JobStatus.ERROR:
        raise _job_error(job.error)
    stream, _ = service.open_result(key_id, job_id)  # from whichever result store holds it
    try:
        values = decode_results(stream.read())
    finally:
        stream.close()
    return make_answer(req, plan, values, frontend.tokenizer, frontend.eos)


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


async def _stream(request: Request, service: Service, frontend: Frontend, req: CompletionRequest,
                  job: Job, plan: Plan, created: int) -> AsyncIterator[str]:
    key_id = request.state.key_id
    head = {"id": _id(req, job.id), "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "system_fingerprint": None}

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        data = {**head, "choices": [] if choice is None else [{"index": 0, **choice}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    if req.chat:
        yield chunk(
            {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
            nnglass={"job": job.id},
        )
    answered = False
    try:  # a stream closed early (the client went away) cancels the job
        async for _ in _follow(request, service, key_id, job.id):
            yield ": waiting\n\n"
        answer = await asyncio.to_thread(_answer, service, frontend, req, key_id, job.id, plan)
        answered = True
    except NNglassError as e:
        answered = True
        yield f"data: {json.dumps(_error_body(e)[1])}\n\n"
        return
    finally:
        if not answered:
            with contextlib.suppress(NNglassError):
                service.cancel(key_id, job.id)
    tok = frontend.tokenizer
    for i, piece in enumerate(answer.pieces):
        lp = logprobs_json(req, answer, tok, i, i + 1)
        body = {"delta": {"content": piece}} if req.chat else {"text": piece}
        yield chunk(
            {**body, "logprobs": lp, "finish_reason": None}, nnglass=extension_json(answer, job.id, i, i + 1)
        )
    end = {"delta": {}} if req.chat else {"text": ""}
    yield chunk({**end, "logprobs": None, "finish_reason": answer.finish_reason}, nnglass={"job": job.id})
    if req.include_usage:
        yield chunk(None, usage=usage(answer))
    yield "data: [DONE]\n\n"
