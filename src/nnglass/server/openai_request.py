"""OpenAI-style request bodies, checked field by field (`POST /v1/completions`,
`POST /v1/chat/completions`).

Invariant: a body either parses into a `CompletionRequest` exactly as written or fails
with a `MalformedError` naming the field (`messages[2].content`, `nnglass.steer[0].scale`).
An unknown field, a wrong type, a value out of range or a feature this server does not
offer (`n` > 1, penalties, `logit_bias`, `echo`) is refused, never ignored: a client that
asked for something must not get an answer that silently lacks it. Sizes (vectors, stop
strings, message counts) are bounded here, before anything is allocated for them.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import MalformedError

MAX_STOP = 4  # OpenAI's own limit
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20
MAX_STEER = 16
MAX_READ = 64
MAX_VECTOR = 1 << 20  # floats in one steering vector
ROLES = ("system", "developer", "user", "assistant", "tool")
POSITIONS = ("all", "prompt", "generated")

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "nnglass",
    "metadata",
    "store",
}
_CHAT = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "parallel_tool_calls"}
_TEXT = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}


@dataclass(frozen=True)
class Steer:
    site: str
    vector: list[float]
    scale: float
    positions: str | tuple[int, ...]  # "all" | "prompt" | "generated" | token positions


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool
    model: str
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict[str, str]] | None  # chat: role and text content
    max_tokens: int | None  # None: the model's limit
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs; 0..20: with that many alternatives
    steer: tuple[Steer, ...] = ()
    read: tuple[str, ...] = ()
    graph: dict[str, Any] | None = None  # the wire JSON of a graph
    graph_tensors: bytes | None = None  # its safetensors part
    extras: dict[str, Any] = field(default_factory=dict)


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    if not isinstance(body, dict):
        raise MalformedError("the request body must be a JSON object")
    known = _CHAT if chat else _TEXT
    for key in body:
        if key not in known:
            raise MalformedError(f"{key}: unknown or unsupported field; this endpoint takes "
                                 f"{', '.join(sorted(known))}")
    model = _str(body, "model", required=True)
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise MalformedError(f"n: only n=1 is supported (one choice per request), got {n}")
    if not chat and _int(body, "best_of", 1, 1) != 1:
        raise MalformedError("best_of: only best_of=1 is supported")
    for key in ("presence_penalty", "frequency_penalty"):
        if _float(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise MalformedError(f"{key}: not supported by this server (send 0 or leave it out)")
    if body.get("logit_bias"):
        raise MalformedError("logit_bias: not supported by this server")
    if not chat and (body.get("echo") or body.get("suffix")):
        raise MalformedError(f"{'echo' if body.get('echo') else 'suffix'}: not supported by this server")
    limit = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _int(body, limit, None, 1)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise MalformedError("stream_options: an object with at most `include_usage`")
    include_usage = bool(options and _bool(options, "include_usage", False, "stream_options."))
    if chat:
        top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        wants = _bool(body, "logprobs", False)
        if top is not None and not wants:
            raise MalformedError("top_logprobs: needs logprobs=true")
        top_logprobs = (top or 0) if wants else None
        prompt, messages = None, _messages(body.get("messages"))
    else:
        top_logprobs = _int(body, "logprobs", None, 0, 5)  # completions: the number of alternatives
        prompt, messages = _prompt(body.get("prompt")), None
    ext = _extension(body.get("nnglass"))
    return CompletionRequest(
        chat=chat, model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0), top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1), stop=_stop(body.get("stop")), stream=stream,
        include_usage=include_usage, top_logprobs=top_logprobs, **ext,
    )


# --- fields -------------------------------------------------------------------------------


def _str(body: dict, key: str, required: bool = False, where: str = "") -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise MalformedError(f"{where}{key}: must be a non-empty string" if required
                             else f"{where}{key}: must be a string")
    return value


def _bool(body: dict, key: str, default: bool, where: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MalformedError(f"{where}{key}: must be true or false, got {value!r:.40}")
    return value


def _int(body: dict, key: str, default: int | None, low: int, high: int | None = None,
         where: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise MalformedError(f"{where}{key}: must be a whole number {span}, got {value!r:.40}")
    return value


def _float(body: dict, key: str, default: float, low: float, high: float, where: str = "") -> float:
    value = body.get(key)
    if value is None:
        return default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        raise MalformedError(f"{where}{key}: must be a number from {low:g} to {high:g}, got {value!r:.40}")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise MalformedError(f"stop: a string or a list of at most {MAX_STOP} non-empty strings "
                             f"(each at most {MAX_STOP_CHARS} characters)")
    return tuple(stops)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # one prompt in a list
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return list(value)
    raise MalformedError("prompt: one non-empty string or one list of token ids (several prompts "
                         "are several requests)")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value or len(value) > MAX_MESSAGES:
        raise MalformedError(f"messages: a non-empty list of at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise MalformedError(f"{where}.role: one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise MalformedError(f'{where}.content: only text parts ({{"type": "text", "text": ...}})')
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise MalformedError(f"{where}.content: must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


# --- the `nnglass` extension ----------------------------------------------------------------


def _extension(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedError("nnglass: must be an object with `steer`, `read` and/or `graph`")
    for key in value:
        if key not in ("steer", "read", "graph", "graph_tensors"):
            raise MalformedError(f"nnglass.{key}: unknown field; use steer, read, graph (and graph_tensors)")
    out: dict[str, Any] = {}
    steer = value.get("steer", [])
    if not isinstance(steer, list) or len(steer) > MAX_STEER:
        raise MalformedError(f"nnglass.steer: a list of at most {MAX_STEER} steering objects")
    out["steer"] = tuple(_steer(s, f"nnglass.steer[{i}]") for i, s in enumerate(steer))
    read = value.get("read", [])
    if (not isinstance(read, list) or len(read) > MAX_READ
            or not all(isinstance(r, str) and r and len(r) <= 256 for r in read)):
        raise MalformedError(f"nnglass.read: a list of at most {MAX_READ} module paths or globs "
                             "(e.g. \"model.layers.*\")")
    out["read"] = tuple(read)
    graph = value.get("graph")
    if graph is not None and not isinstance(graph, dict):
        raise MalformedError("nnglass.graph: a graph in nnglass's wire format (a JSON object)")
    out["graph"] = graph
    tensors = value.get("graph_tensors")
    if tensors is not None:
        if graph is None or not isinstance(tensors, str):
            raise MalformedError(
                "nnglass.graph_tensors: base64 of the graph's safetensors part, with `graph`"
            )
        out["graph_tensors"] = _b64(tensors, "nnglass.graph_tensors")
    return out


def _steer(s: Any, where: str) -> Steer:
    if not isinstance(s, dict):
        raise MalformedError(f"{where}: an object with site, vector, scale and positions")
    for key in s:
        if key not in ("site", "vector", "scale", "positions"):
            raise MalformedError(f"{where}.{key}: unknown field; use site, vector, scale, positions")
    site = _str(s, "site", required=True, where=f"{where}.")
    if "*" in site:
        raise MalformedError(f"{where}.site: one module path, not a glob")
    return Steer(
        site,
        _vector(s.get("vector"), f"{where}.vector"),
        _float(s, "scale", 1.0, -1e6, 1e6, where=f"{where}."),
        _positions(s.get("positions", "all"), where),
    )


def _vector(value: Any, where: str) -> list[float]:
    if isinstance(value, str):
        raw = _b64(value, where)
        if len(raw) % 4 or not raw or len(raw) > 4 * MAX_VECTOR:
            raise MalformedError(
                f"{where}: base64 of a little-endian float32 array (1 to {MAX_VECTOR} values)"
            )
        import array

        floats = array.array("f")
        floats.frombytes(raw)
        values = floats.tolist()
    elif isinstance(value, list) and 0 < len(value) <= MAX_VECTOR:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise MalformedError(f"{where}: a list of numbers")
        values = [float(v) for v in value]
    else:
        raise MalformedError(
            f"{where}: a list of numbers or base64 of a float32 array (1 to {MAX_VECTOR} values)"
        )
    if not all(math.isfinite(v) for v in values):
        raise MalformedError(f"{where}: every value must be finite")
    return values


def _positions(value: Any, where: str) -> str | tuple[int, ...]:
    if value in POSITIONS:
        return str(value)
    ints = isinstance(value, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in value)
    if ints and 0 < len(value) <= 4096 and all(0 <= p < 2**31 for p in value):
        return tuple(sorted(set(value)))
    raise MalformedError(
        f'{where}.positions: "all", "prompt", "generated" or a list of token positions (ints >= 0)'
    )


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise MalformedError(f"{where}: not valid base64") from None
