"""The dashboard: one HTML page and its static files at `/`, and `GET /v1/events`, the
one stream that page opens (every change of the caller's jobs, and of the models).

Invariants:
- Open without a key: exactly `/` and `/static/<name>` for the files shipped in
  `static/` (read once, at import; never a path built from the request), so no spelling
  of a path (`/static/../v1/jobs`, `%2e%2e`, `//`) reaches anything else without the
  key. Everything that returns data needs the key, sent by the page as a Bearer header.
- The page is served with a Content-Security-Policy that allows only its own script,
  style and connections, and no form submission: the key never leaves in a URL.
- `/v1/events` sends only the caller's jobs: a changed job of another key is read once,
  then ignored by id; it never reaches the stream. Models are sent when they change
  (and at the start), and re-checked at each keep-alive (about every 15 s), which is
  when a change that published nothing (a worker restarted) shows up. Each stream is
  woken by every change on the server, so one key may hold at most
  `MAX_STREAMS_PER_KEY` open at once (more: 429).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from weakref import WeakSet

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import NotFoundError, QuotaError, UnavailableError
from .events import wait
from .service import Service

__all__ = ["OPEN_PATHS", "add_dashboard"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files(__package__) / "static"
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


_STATIC = _load_static()
OPEN_PATHS = frozenset({"/", *(f"/static/{name}" for name in _STATIC if name != "index.html")})
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
KEEP_ALIVE_S = 15.0
COALESCE_S = 0.1  # a burst of changes (a queue moving) goes out as one batch of events
_TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
MAX_STREAMS_PER_KEY = 8  # a page opens one; a few tabs and scripts fit
_MAX_FOREIGN = 10_000  # other keys' job ids a stream remembers not to read (then it forgets them all)


def add_dashboard(app: FastAPI, service: Service, retry_after_s: float) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        body, media = _STATIC["index.html"]
        return Response(body, media_type=media, headers=_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC or name == "index.html":
            raise NotFoundError(f"no static file {name!r}")
        body, media = _STATIC[name]
        return Response(body, media_type=media, headers=_HEADERS)

    # key_id -> its streams open now. Weak: a stream whose response never started (the
    # client left first) never runs its `finally`, but is collected, and so not counted.
    open_streams: defaultdict[str, WeakSet[AsyncIterator[str]]] = defaultdict(WeakSet)

    @app.get("/v1/events")
    async def events(request: Request) -> StreamingResponse:
        key_id = request.state.key_id
        mine = open_streams[key_id]
        if len(mine) >= MAX_STREAMS_PER_KEY:
            raise QuotaError(f"this key already has {MAX_STREAMS_PER_KEY} event streams open; close one")

        async def counted() -> AsyncIterator[str]:
            try:
                async for chunk in _stream(service, key_id, request, retry_after_s):
                    yield chunk
            finally:  # also when the client goes away: the task is cancelled inside the stream
                mine.discard(stream)
                if not mine:
                    open_streams.pop(key_id, None)

        stream = counted()
        mine.add(stream)
        headers = {"Cache-Control": "no-store"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _stream(
    service: Service, key_id: str, request: Request, retry_after_s: float
) -> AsyncIterator[str]:
    sent: dict[str, dict[str, Any]] = {}  # this key's jobs not yet ended: the last status sent
    foreign: set[str] = set()  # other keys' jobs: never read again
    last_models: list[dict[str, Any]] | None = None
    with service.hub.listen_all() as changes:
        while True:
            ids = changes.take() - foreign
            out: list[str] = []
            pause = KEEP_ALIVE_S
            try:
                models, jobs = await asyncio.to_thread(_read, service, ids)
            except UnavailableError:  # a locked database: keep the ids, ask again soon
                for job_id in ids:
                    changes.add(job_id)
                models, jobs, pause = last_models, [], retry_after_s
            if models != last_models:
                last_models = models
                out.append(_event("models", models))
            for job_id in ids:
                owner, status = jobs.get(job_id, (None, None))
                if status is None or owner != key_id:
                    if len(foreign) >= _MAX_FOREIGN:
                        foreign.clear()
                    foreign.add(job_id)  # a missing job stays missing; another key's is not ours
                    continue
                if sent.get(job_id) != status:
                    out.append(_event("job", status))
                    sent[job_id] = status
                if status["status"] in _TERMINAL:
                    sent.pop(job_id, None)  # ended: nothing more will change but its expiry
            yield "".join(out) or ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await wait(changes.event, pause)
            await asyncio.sleep(COALESCE_S)


_Owned = dict[str, tuple[str, dict[str, Any]]]  # job id -> (its key_id, its status object)


def _read(service: Service, ids: set[str]) -> tuple[list[dict[str, Any]], _Owned]:
    """The models, and each changed job that still exists."""
    found = ((job_id, service.jobs.get(job_id)) for job_id in ids)
    jobs = {job_id: (job.key_id, service.status(job)) for job_id, job in found if job is not None}
    return service.models_info(), jobs
