"""Configuration, in one place: explicit arguments, then NNGLASS_* variables, then defaults.

| setting   | variable             | default             |
|-----------|----------------------|---------------------|
| home      | NNGLASS_HOME         | ~/.nnglass          |
| cache     | NNGLASS_CACHE        | ~/.cache/nnglass    |
| host      | NNGLASS_HOST         | http://127.0.0.1:8321 |
| api key   | NNGLASS_API_KEY      | (none)              |
| roundtrip | NNGLASS_ROUNDTRIP    | 0 (1: run every local graph through the JSON codec) |
"""

from __future__ import annotations

import os
from pathlib import Path

_overrides: dict[str, str] = {}


def configure(*, host: str | None = None, api_key: str | None = None) -> None:
    """Set the remote host and API key for this process (beats the environment)."""
    if host is not None:
        _overrides["host"] = host
    if api_key is not None:
        _overrides["api_key"] = api_key


def home() -> Path:
    return Path(os.environ.get("NNGLASS_HOME") or Path.home() / ".nnglass")


def cache_dir() -> Path:
    return Path(os.environ.get("NNGLASS_CACHE") or Path.home() / ".cache" / "nnglass")


def host() -> str:
    return _overrides.get("host") or os.environ.get("NNGLASS_HOST") or "http://127.0.0.1:8321"


def api_key() -> str | None:
    return _overrides.get("api_key") or os.environ.get("NNGLASS_API_KEY")


def roundtrip() -> bool:
    return os.environ.get("NNGLASS_ROUNDTRIP", "0") not in ("", "0", "false")
