"""OpenAI's error shape for nnglass errors: `{"error": {"message", "type", "param", "code"}}`,
one HTTP status per nnglass error class (`OPENAI_STATUS`), and a failed job's stored error
as the nnglass error it names.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

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
    status, body = error_body(e)
    headers = {"Retry-After": "2"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(e: NNglassError) -> tuple[int, dict[str, Any]]:
    status, kind, code = next((s, k, c) for cls, s, k, c in OPENAI_STATUS if isinstance(e, cls))
    message = f"{e.message} (at {e.where})" if e.where else e.message
    head = e.message.split(":", 1)[0]
    param = head if isinstance(e, MalformedError) and " " not in head else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def job_error(error: dict[str, Any] | None) -> NNglassError:
    """A failed job's stored error as the nnglass class it names (unknown: RemoteError, 500)."""
    error = error or {}
    cls = _JOB_ERRORS.get(str(error.get("type")), RemoteError)
    return cls(str(error.get("message") or "the job failed"), str(error.get("where") or ""))


_JOB_ERRORS: dict[str, type[NNglassError]] = {c.__name__: c for c in (
    PolicyError, GraphError, MalformedError, TraceError, ExecutionError, TimeLimitError, ResourceLimitError,
    OutOfOrderError)}


