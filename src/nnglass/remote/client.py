"""The client of the nnglass service: a Backend that runs graphs on a server.

Invariants:
- Only data travels: the graph goes out as `graph.wire.encode` writes it (JSON, plus a
  safetensors part when tensors are attached); the result comes back as one safetensors
  file read by `graph.results.decode_results`. Nothing is pickled or unpickled.
- Saved values are exactly what a local run gives: the server encodes them with the same
  codec, and this module hands them over untouched (no casts, no device moves).
- Every failure is an `NNglassError`. A server-side error keeps its class (looked up by
  name in a fixed table; unknown names become RemoteError), its message and the user's
  file:line that the graph carried. HTTP refusals and an unreachable host become
  RemoteError (VersionError for a wire-version mismatch) saying what to do.
- A 503 with Retry-After (the server's database busy or away: it kept nothing of the
  request) is asked again after that many seconds, for up to `patience` seconds; then it
  is a RemoteError like any refusal.
- A job is followed through its event stream, or, once the stream breaks, by polling with
  backoff. Its result is downloaded at most once; done-callbacks run once, in order.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from .. import _config
from ..errors import (
    ExecutionError,
    GraphError,
    NNglassError,
    OutOfOrderError,
    PolicyError,
    RemoteError,
    TimeLimitError,
    TraceError,
    VersionError,
)
from ..graph import wire
from ..graph.ir import Graph
from ..graph.results import decode_results
from .status import Status, status_for

log = logging.getLogger(__name__)

TERMINAL = frozenset({"COMPLETED", "ERROR", "CANCELLED"})
_CLASSES = (TraceError, GraphError, VersionError, ExecutionError, OutOfOrderError, TimeLimitError,
            PolicyError, RemoteError)
ERRORS: dict[str, type[NNglassError]] = {c.__name__: c for c in _CLASSES}
_ADVICE = {
    400: "the server could not read the request; use an nnglass version this server speaks",
    401: "set NNGLASS_API_KEY, or call nnglass.configure(api_key=...), to a key made with "
    "`nnglass keys create NAME` on the server",
    409: "client and server speak different wire versions; install a matching nnglass",
    422: "the server refused the graph as written; fix it as the message says",
    413: "the request is too large for this server; attach smaller tensors or split the work",
    429: "your quota on this server is used up; wait and try again, or ask its admin",
}


def server_error(detail: Any, fallback: str) -> NNglassError:
    """`{"message", "where", "type"}` from the server as the matching nnglass exception."""
    if isinstance(detail, dict) and detail.get("message"):
        cls = ERRORS.get(str(detail.get("type", "")), RemoteError)
        return cls(str(detail["message"]), str(detail.get("where") or ""))
    return RemoteError(f"{fallback}: {detail}" if detail else fallback)


class RemoteBackend:
    """Runs graphs on the server at `host` (default: NNGLASS_HOST) with `api_key`.

    `progress`: show the status line on stderr (None: only when stderr is a terminal).
    `timeout`: seconds for each HTTP exchange (not for the job; see `Job.wait`).
    `transport`: an httpx transport (tests pass `httpx.MockTransport`).
    `poll`: (first, largest) delay in seconds between status polls.
    `patience`: seconds to keep polling a server that does not answer (a restart keeps jobs).
    """

    patience = 60.0

    def __init__(self, host: str | None = None, api_key: str | None = None,
                 progress: bool | None = None, timeout: float = 30.0, *,
                 transport: httpx.BaseTransport | None = None,
                 poll: tuple[float, float] = (0.1, 2.0)) -> None:
        host = (host or _config.host()).rstrip("/")
        self.host = host if "://" in host else f"http://{host}"
        self.api_key = api_key if api_key is not None else _config.api_key()
        self.progress = progress
        self.timeout = timeout
        self.poll = poll
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.Client(base_url=self.host, headers=headers, timeout=timeout,
                                   transport=transport)

    def submit(self, graph: Graph) -> Job:
        """Send the graph; return its Job as soon as the server has accepted it."""
        json_bytes, tensor_bytes = wire.encode(graph)
        if tensor_bytes is None:
            body: dict[str, Any] = {"content": json_bytes, "headers": {"Content-Type": "application/json"}}
        else:
            body = {"files": {"graph": ("graph.json", json_bytes, "application/json"),
                              "tensors": ("tensors.safetensors", tensor_bytes, "application/octet-stream")}}
        info = self.request("POST", "/v1/jobs", f"model {graph.model!r}", **body).json()
        job = Job(self, str(info["id"]), info)
        log.info("submitted job %s to %s (%s)", job.id, self.host, info.get("status"))
        return job

    def job(self, job_id: str) -> Job:
        """A handle on an earlier job of this key (e.g. from another process)."""
        return Job(self, job_id, {"id": job_id, "status": "RECEIVED"})

    def request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        start = time.monotonic()
        while True:
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                raise self.unreachable(e) from None
            wait = _retry_after(response)
            if wait is None or time.monotonic() - start + wait > self.patience:
                break
            log.info("%s answered 503 for %s; asking again in %g s", self.host, what, wait)
            time.sleep(wait)
        self.check(response, what)
        return response

    def check(self, response: httpx.Response, what: str) -> None:
        """Raise the nnglass exception for a refusal; `what` names the thing asked for."""
        code = response.status_code
        if code < 400:
            return
        response.read()
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text.strip()
        if code == 422 and isinstance(detail, dict) and detail.get("type"):
            raise server_error(detail, "")
        said = detail.get("message") if isinstance(detail, dict) else detail
        where = str(detail.get("where") or "") if isinstance(detail, dict) else ""
        said = f": {said}" if said else ""
        if code == 401 and not self.api_key:
            advice = "no API key is set; " + _ADVICE[401]
        elif code == 404 and what.startswith("model"):
            advice = f"{what} is not served there; `GET /v1/models` lists what it serves"
        elif code == 404:
            advice = f"{what} is not there, or not yours (results expire; keys differ)"
        elif code == 429 and response.headers.get("Retry-After"):
            advice = _ADVICE[429].replace("wait", f"wait {response.headers['Retry-After']} s")
        else:
            advice = _ADVICE.get(code, "the server failed; try again, or tell its admin")
        error = (VersionError if code == 409 else RemoteError)(
            f"{self.host} answered {code} for {what}{said}; {advice}", where)
        error.transient = code >= 500  # type: ignore[attr-defined]  # worth asking again
        raise error

    def unreachable(self, e: Exception) -> RemoteError:
        error = RemoteError(f"cannot reach the nnglass server at {self.host} ({type(e).__name__}: {e}); "
                            "start one with `nnglass serve --model NAME`, or set NNGLASS_HOST or "
                            "nnglass.configure(host=...)")
        error.transient = True  # type: ignore[attr-defined]
        return error

    def close(self) -> None:
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a 503 asks the client to wait before asking again (None: not such an answer)."""
    if response.status_code != 503:
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:  # absent, or an HTTP date: not the server's "busy, ask again"
        return None
    return seconds if 0 <= seconds <= 3600 else None


class Job:
    """A submitted graph: `id`, `status()`, `wait()`, `cancel()`, `result()`, `on_done()`."""

    def __init__(self, backend: RemoteBackend, job_id: str, info: dict[str, Any]) -> None:
        self.id = job_id
        self.info = dict(info)  # the last status object seen
        self._backend = backend
        self._values: dict[int, Any] | None = None
        self._error: NNglassError | None = None
        self._callbacks: list[Callable[[dict[int, Any]], Any]] = []

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.info.get('status')!r})"

    @property
    def done(self) -> bool:
        return self._values is not None or self._error is not None

    def status(self) -> str:
        """RECEIVED, QUEUED, RUNNING, COMPLETED, ERROR or CANCELLED (asks the server)."""
        if not self.done:
            self.info = self._get()
        return str(self.info["status"])

    def on_done(self, callback: Callable[[dict[int, Any]], Any]) -> None:
        """Call `callback(values)` once the values are here (now, if they already are)."""
        if self._values is not None:
            callback(self._values)
        else:
            self._callbacks.append(callback)

    def cancel(self) -> str:
        """Ask the server to cancel; returns the status it answers with."""
        self.info = self._backend.request("DELETE", f"/v1/jobs/{self.id}", f"job {self.id}").json()
        return str(self.info["status"])

    def result(self, timeout: float | None = None) -> dict[int, Any]:
        """The saved values by node id (a session: by trace index, then node id)."""
        self.wait(timeout)
        assert self._values is not None
        return self._values

    def wait(self, timeout: float | None = None) -> None:
        """Block until the job ends and its values are here; raise its error if it failed."""
        if self._error is not None:
            raise self._error
        if self._values is not None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with status_for(self._backend.progress) as line:
            info = self.info if self.info.get("status") in TERMINAL else None
            info = info or self._follow(deadline, line) or self._poll(deadline, timeout, line)
            status = info["status"]
            if status == "ERROR":
                self._error = server_error(info.get("error"), f"job {self.id} failed on the server")
            elif status == "CANCELLED":
                self._error = RemoteError(f"job {self.id} was cancelled; its values will never come")
            else:
                self._values = self._download(line)
        if self._error is not None:
            raise self._error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self._values)

    # --- following the job ---------------------------------------------------------------
    def _get(self) -> dict[str, Any]:
        return self._backend.request("GET", f"/v1/jobs/{self.id}", f"job {self.id}").json()

    def _seen(self, info: dict[str, Any], line: Status) -> None:
        self.info = info
        line.job(info)

    def _follow(self, deadline: float | None, line: Status) -> dict[str, Any] | None:
        """The terminal status from the event stream; None if the stream broke first."""
        b = self._backend
        read = 60.0 if deadline is None else max(0.01, min(60.0, deadline - time.monotonic()))
        try:
            with b.client.stream("GET", f"/v1/jobs/{self.id}/events",
                                 timeout=httpx.Timeout(b.timeout, read=read)) as r:
                if r.status_code in (401, 404):
                    b.check(r, f"job {self.id}")
                if r.status_code != 200 or "text/event-stream" not in r.headers.get("content-type", ""):
                    log.debug("job %s: no event stream (%s); polling", self.id, r.status_code)
                    return None
                for info in _events(r.iter_lines()):
                    self._seen(info, line)
                    if info.get("status") in TERMINAL:
                        return info
        except (httpx.HTTPError, httpx.StreamError, ValueError) as e:
            log.debug("job %s: event stream broke (%s); polling", self.id, e)
        return None

    def _poll(self, deadline: float | None, timeout: float | None, line: Status) -> dict[str, Any]:
        delay, largest = self._backend.poll
        outage: float | None = None  # since when the server has not answered (it may be restarting)
        while True:
            try:
                info = self._get()
            except RemoteError as e:
                outage = outage or time.monotonic()
                if not getattr(e, "transient", False) or time.monotonic() - outage > self._backend.patience:
                    raise
                info = self.info
            else:
                outage = None
                self._seen(info, line)
            if info.get("status") in TERMINAL:
                return info
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise RemoteError(f"job {self.id} is still {info.get('status')} after {timeout} s; "
                                  "call job.wait() again, or job.cancel()")
            time.sleep(delay if deadline is None else min(delay, deadline - now))
            delay = min(largest, delay * 1.5)

    def _download(self, line: Status) -> dict[int, Any]:
        b, what = self._backend, f"the result of job {self.id}"
        buf = bytearray()
        try:
            with b.client.stream("GET", f"/v1/jobs/{self.id}/result") as r:
                b.check(r, what)
                length = r.headers.get("Content-Length")
                total = int(length) if length else self.info.get("result_bytes")
                for chunk in r.iter_bytes():
                    buf += chunk
                    line.download(r.num_bytes_downloaded or len(buf), total)  # raw bytes, if counted
                got = r.num_bytes_downloaded or len(buf)
        except httpx.TransportError as e:
            raise RemoteError(f"downloading {what} from {b.host} broke off ({type(e).__name__}: {e}); "
                              "call job.result() to try again") from None
        if length and got != int(length):
            raise RemoteError(f"{what} arrived truncated ({got} of {length} bytes); "
                              "call job.result() to try again")
        return decode_results(bytes(buf))


def _events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events: each event's `data:` lines joined, parsed as a JSON object."""
    data: list[str] = []
    for text in itertools.chain(lines, [""]):  # the last event may lack its closing blank line
        if text.startswith("data:"):
            data.append(text[5:].removeprefix(" "))
        elif not text and data:
            event = json.loads("\n".join(data))
            if not isinstance(event, dict):
                raise ValueError(f"an event is not a status object: {event!r:.60}")
            yield event
            data = []
        # comments (":"), "event:", "id:" and "retry:" carry nothing we need


_SHARED: dict[tuple[str, str | None], RemoteBackend] = {}
_SHARED_LOCK = threading.Lock()


def shared_backend() -> RemoteBackend:
    """One backend (one HTTP connection pool) per host and key, as configured right now."""
    key = (_config.host(), _config.api_key())
    with _SHARED_LOCK:
        backend = _SHARED.get(key)
        if backend is None:
            backend = _SHARED[key] = RemoteBackend(*key)
        return backend
