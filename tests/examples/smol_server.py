"""One embedded server for SmolLM2-135M, for the tests that run examples and docs as a user
would: `nnglass serve --config` on a random loopback port (tests/service_fixtures.py's
`Server`), models converted into the repository's `.nnglass-cache`, one API key.

Imported by path (tests/examples and tests/docs each have their own conftest).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".nnglass-cache"  # as tests/models/conftest.py: converted once per machine
THREADS = 2  # the examples set 2 torch threads too: local and remote runs compute alike

TOML = f"""
[server]
host = "127.0.0.1"
port = PORT
home = "HOME"

[[models]]
name = "smollm2-135m"
source = "smollm2-135m"
threads = {THREADS}

[models.policy.limits]
run_seconds = 600  # a shared 2-core machine can be slow
"""


def _server_class() -> type:
    path = REPO / "tests" / "service_fixtures.py"
    spec = importlib.util.spec_from_file_location("_nnglass_server_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.Server


@dataclass
class Running:
    url: str
    key: str
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client of this server (as `make demo` gives its client)."""
        return {**os.environ, "NNGLASS_CACHE": str(CACHE), "NNGLASS_HOME": str(self.home),
                "NNGLASS_HOST": self.url, "NNGLASS_API_KEY": self.key, **extra}


@contextmanager
def smol_server(home: Path) -> Iterator[Running]:
    """A started server for SmolLM2 with its state in `home`; stopped on exit."""
    saved = os.environ.get("NNGLASS_CACHE")
    os.environ["NNGLASS_CACHE"] = str(CACHE)  # the server (and its worker) inherit it
    server = _server_class()(home, TOML)
    try:
        server.start(timeout=600)  # the first use converts SmolLM2 (~20 s), then loads it
        _, key = server.keys.create("examples")
        yield Running(server.url, key, home)
    finally:
        server.stop()
        if saved is None:
            os.environ.pop("NNGLASS_CACHE", None)
        else:
            os.environ["NNGLASS_CACHE"] = saved
