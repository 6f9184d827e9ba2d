"""The HTTP API (docs/service.md): routes, the key check, size limits, the error table.

Invariants: the API key is checked before anything else on every path but /health and
the dashboard's page and static files (`dashboard.OPEN_PATHS`, exact paths, no data)
(no key or a bad key: 401, even for a job that does not exist); a body over the size
limit is refused before it is read whole; every nnglass error maps to one status code
through `STATUS`, with a JSON body naming the message, the user's line and the type
(503 also says when to try again, in Retry-After). The event loop never waits on the
database: every store access runs in a worker thread, so a locked database slows the
requests that need it, not every request.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, BinaryIO

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..errors import (
    AuthError,
    GraphError,
    MalformedError,
    NNglassError,
    NotFoundError,
    PolicyError,
    QuotaError,
    TooLargeError,
    UnavailableError,
    VersionError,
)
from .arrivals import closing
from .config import ServerConfig
from .dashboard import OPEN_PATHS as DASHBOARD_PATHS
from .dashboard import add_dashboard
from .events import wait
from .model_meta import add_meta
from .openai_api import OPENAI_PATHS, add_openai, models_page, openai_error
from .openai_graph import Frontends
from .service import Service
from .steps import StepLog

# Most specific first: the first class an error is an instance of decides its status.
STATUS: list[tuple[type[NNglassError], int]] = [
    (MalformedError, 400),
    (AuthError, 401),
    (NotFoundError, 404),
    (VersionError, 409),
    (TooLargeError, 413),
    (PolicyError, 422),
    (GraphError, 422),
    (QuotaError, 429),
    (UnavailableError, 503),
    (NNglassError, 400),
]
SUBMISSIONS = frozenset({"/v1/jobs", *OPENAI_PATHS})  # POSTs that queue a job
_OPEN_PATHS = frozenset({"/health", *DASHBOARD_PATHS})  # compared whole: no prefix is open
RETRY_AFTER_S = 2  # what a 503 tells the client to wait: about one busy timeout (db.py)
LIST_LIMIT = 50  # jobs a page of `GET /v1/jobs` holds unless `limit` says fewer (at most MAX)
MAX_LIST_LIMIT = 200


def error_response(e: NNglassError) -> JSONResponse:
    status = next(code for cls, code in STATUS if isinstance(e, cls))
    detail = {"message": e.message, "where": e.where, "type": type(e).__name__}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Guard:
    """The key check and the size limit, as plain ASGI middleware: it runs before any route
    and never touches the response stream (a BaseHTTPMiddleware would re-chunk every
    download through another task, ~25% of a large result's serving cost)."""

    def __init__(self, app: Any, service: Service, limit: int) -> None:
        self.app, self.service, self.limit = app, service, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._call(scope, receive, send)

    async def _call(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        refuse = openai_error if scope["path"] in OPENAI_PATHS else error_response  # each API its shape
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in _OPEN_PATHS:
            header = headers.get("authorization", "")
            key = header[7:].strip() if header[:7].lower() == "bearer " else None
            try:
                key_id = await asyncio.to_thread(self.service.keys.verify, key) if key else None
            except UnavailableError as e:  # cannot tell now: not a 401
                return await refuse(e)(scope, receive, send)
            if key_id is None:
                return await refuse(AuthError(
                    "missing or invalid API key: send `Authorization: Bearer <key>` "
                    "(NNGLASS_API_KEY on the client; `nnglass keys create NAME` on the server)",
                ))(scope, receive, send)
            scope.setdefault("state", {})["key_id"] = key_id
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            error = TooLargeError(f"request body over {self.limit} bytes")
            return await refuse(error)(scope, receive, send)
        if scope["method"] != "POST" or scope["path"] not in SUBMISSIONS:
            return await self.app(scope, receive, send)
        # A pass about to start waits for this job (arrivals.py): a key's, never an anonymous
        # caller's. The route closes it once the job is queued, this when the request ends,
        # whichever comes first.
        closer = self.service.arrivals.open()
        scope["state"]["arrived"] = closer
        try:
            return await self.app(scope, receive, send)
        finally:
            closer()


def create_app(config: ServerConfig, service: Service | None = None, start: bool = True) -> FastAPI:
    service = service or Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start:
            service.start()
        try:
            yield
        finally:
            if start:
                service.stop()

    app = FastAPI(title="nnglass", version="1.0", lifespan=lifespan)
    app.state.service = service

    app.add_middleware(Guard, service=service, limit=config.max_request_bytes)

    @app.exception_handler(NNglassError)
    async def nnglass_error(request: Request, e: NNglassError) -> JSONResponse:
        return error_response(e)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {n: s.state for n, s in service.models.items()}}

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict[str, Any]:
        try:
            graph_json, tensors = await _read_graph(request, config.max_request_bytes)
            arrived, key_id = request.state.arrived, request.state.key_id
            submit = closing(arrived, service.submit)  # closed once queued (`arrived`), or refused

            def take_in() -> dict[str, Any]:  # the status reads the queue: off the event loop too
                return service.status(submit(key_id, graph_json, tensors, arrived))

            return await asyncio.to_thread(take_in)
        finally:
            request.state.arrived()  # refused before it (arrivals.py)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, limit: str | None = None, before: str | None = None) -> Any:
        key_id, n = request.state.key_id, _limit(limit)

        def page() -> dict[str, Any]:  # the caller's jobs, newest first; `next` is the next `before`
            jobs, cursor = service.list_jobs(key_id, n, before)
            return {"jobs": service.statuses(jobs), "next": cursor}

        return await asyncio.to_thread(page)

    @app.get("/v1/jobs/{job_id}")
    async def status(job_id: str, request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(service.job_status, request.state.key_id, job_id)

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, steps: bool = False) -> StreamingResponse:
        job = await asyncio.to_thread(service.get, request.state.key_id, job_id)

        async def stream() -> AsyncIterator[str]:
            last, cursor = None, -1  # cursor: the last step sent (-1: none; None: not sending them)
            with service.hub.listen(job_id, steps=steps) as changed:
                while True:
                    changed.clear()  # before reading: a change after the read wakes the wait
                    pause = 15.0
                    if steps and cursor is not None:
                        lines, cursor = step_events(service.steps, job_id, cursor)
                        for line in lines:
                            yield line
                    try:
                        current = await asyncio.to_thread(service.job_status, job.key_id, job_id)
                    except UnavailableError:  # a locked database: the stream stays, and asks again soon
                        current, pause = last, float(RETRY_AFTER_S)
                    if current != last:
                        last = current
                        yield f"data: {json.dumps(current)}\n\n"
                        if current["status"] in ("COMPLETED", "ERROR", "CANCELLED"):
                            return
                    else:
                        yield ": keep-alive\n\n"
                    if await request.is_disconnected():
                        return
                    await wait(changed, timeout=pause)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}/result")
    async def result(job_id: str, request: Request) -> StreamingResponse:
        # Streamed from whichever store holds it, after the key check; never a link.
        stream, size, whole = await asyncio.to_thread(_open_result, service, request.state.key_id, job_id)
        headers = {"Content-Disposition": f'attachment; filename="{job_id}.safetensors"'}
        if whole is not None:  # one chunk or less: read with the key check, sent in one piece
            return Response(whole, media_type="application/octet-stream", headers=headers)
        headers["Content-Length"] = str(size)
        return StreamingResponse(_chunks(stream), media_type="application/octet-stream", headers=headers)

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict[str, Any]:
        job = await asyncio.to_thread(service.cancel, request.state.key_id, job_id)
        return service.status(job)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        return models_page(service.models_info(), request)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics(), media_type="text/plain; version=0.0.4")

    add_dashboard(app, service, RETRY_AFTER_S)
    frontends = Frontends({m.name: m.source for m in config.models},
                          {m.name: m.attention for m in config.models})
    add_meta(app, frontends)
    add_openai(app, service, frontends)
    return app


_CHUNK = 1 << 20


def _open_result(service: Service, key_id: str, job_id: str) -> tuple[BinaryIO, int, bytes | None]:
    """The result's stream and size; a result of at most one chunk is read whole here
    (`whole`), in the thread that checked the job, instead of a thread call a chunk."""
    stream, size = service.open_result(key_id, job_id)
    if size > _CHUNK:
        return stream, size, None
    with stream:
        whole = stream.read(_CHUNK + 1)
    if len(whole) != size:  # a damaged file: streamed against its recorded size, as a big one
        return (*service.open_result(key_id, job_id), None)
    return stream, size, whole


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    """A result's bytes, read in a worker thread a chunk at a time; closed at the end or
    when the client goes away."""
    try:
        while chunk := await asyncio.to_thread(stream.read, _CHUNK):
            yield chunk
    finally:
        await asyncio.to_thread(stream.close)


def step_events(log: StepLog, job_id: str, cursor: int) -> tuple[list[str], int | None]:
    """`event: step` lines for the steps after `cursor`, and the new cursor. A gap (steps this
    stream can no longer send) is one `{"gap": true}` and the last (cursor None)."""
    got = log.read(job_id, cursor)
    if got.gap:
        return ['event: step\ndata: {"gap": true}\n\n'], None
    lines = []
    for step in got.steps:
        data: dict[str, Any] = {"step": step.step, "tokens": step.tokens}
        if step.data:
            data["values"] = base64.b64encode(step.data).decode("ascii")
        if step.dropped:
            data["dropped"] = True
        lines.append(f"event: step\ndata: {json.dumps(data)}\n\n")
        cursor = step.step
    return lines, cursor


def _limit(text: str | None) -> int:
    """`?limit=` of `GET /v1/jobs`: 1 to MAX_LIST_LIMIT (more is capped), LIST_LIMIT if absent."""
    if text is None:
        return LIST_LIMIT
    if not text.isdigit() or int(text) < 1:
        raise MalformedError(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, not {text[:20]!r}")
    return min(int(text), MAX_LIST_LIMIT)


async def _read_graph(request: Request, limit: int) -> tuple[bytes, bytes | None]:
    """The graph JSON and its tensors, from a JSON body or a multipart one; bounded."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"request body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise MalformedError("the client went away before the body was complete") from None
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        return body, None
    if ctype.startswith("multipart/form-data"):
        return await _multipart(request, body)
    raise MalformedError("send the graph as application/json, or multipart/form-data with a "
                         "`graph` part and a `tensors` part")


async def _multipart(request: Request, body: bytes) -> tuple[bytes, bytes | None]:
    request._body = body  # starlette parses the form from the cached body
    try:
        form = await request.form(max_files=2, max_fields=2)
    except Exception as e:
        raise MalformedError(f"bad multipart body: {e}") from None
    parts: dict[str, bytes] = {}
    for name in ("graph", "tensors"):
        part = form.get(name)
        if part is None:
            continue
        parts[name] = await part.read() if hasattr(part, "read") else str(part).encode()
    await form.close()
    if "graph" not in parts:
        raise MalformedError("the multipart body has no `graph` part")
    return parts["graph"], parts.get("tensors")
