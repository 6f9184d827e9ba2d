"""Streams across frontends (server/step_relay.py): on the cluster backend (Ray actors,
PostgreSQL, S3), a client streams through frontend B a completion that only frontend A's
Ray worker can run (B's replica asks for a Ray resource no node has), and gets its tokens
while the job runs (the step gate, provider_fixtures.py: every step waits while it holds),
the chunks joined being the answer B gives for the same request not streamed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from nnglass.server.worker import TEST_GATE
from service_fixtures import Backend, Server

pytestmark = pytest.mark.backends("cluster")

TOML = """[server]
host = "127.0.0.1"
port = PORT
home = "HOME"

[[models]]
name = "relay"
source = "{source}"
threads = {threads}
{resources}
"""


@pytest.fixture(scope="module")
def frontends(
    backend: Backend,
    tiny_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Server, Path, str]]:
    gate, stores = tmp_path_factory.mktemp("relay-gate") / "gate", backend.stores()
    started: list[Server] = []

    def start(name: str, resources: str, models_ready: bool) -> Server:
        text = TOML.format(source=tiny_dir, threads=torch.get_num_threads(), resources=resources)
        server = Server(
            tmp_path_factory.mktemp(name),
            backend.engine.config(text),
            env={**backend.engine.env, TEST_GATE: str(gate)},
            stores=stores,
        )
        started.append(server)
        server.start(models_ready=models_ready)
        return server

    try:
        a = start("relay-a", "", True)
        b = start("relay-b", "resources = {num_cpus = 1, no_such_node = 1}", False)  # never placed
        yield a, b, gate, a.keys.create("relay")[1]
    finally:
        gate.unlink(missing_ok=True)
        for server in started[:1]:
            server.stop()
        for server in started[1:]:
            server.kill()  # (B's replica waits on Ray for a node it never gets; its actor goes with B)


def test_a_stream_through_another_frontend_comes_token_by_token(
    frontends: tuple[Server, Server, Path, str],
) -> None:
    a, b, gate, key = frontends
    client = openai.OpenAI(base_url=f"{b.url}/v1", api_key=key, max_retries=0, timeout=120)
    kw: dict[str, Any] = {"model": "relay", "prompt": "across", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**kw)  # through B, run by A (B cannot run it)
    gate.touch()  # every step waits: the job cannot end while this holds
    try:
        stream = client.completions.create(**kw, stream=True)
        first = next(iter(stream))
        job = first.nnglass["job"]  # type: ignore[attr-defined]
        got = httpx.get(f"{b.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert got.json()["status"] == "RUNNING"
    finally:
        gate.unlink()
    chunks = [first, *stream]
    parts = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert len(parts) == whole.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "relay" not in _ready_models(b)  # B's replica never ran anything: A ran both
    assert a.metric(key, 'nnglass_jobs_finished_total{status="COMPLETED"}') == 2


def _ready_models(server: Server) -> set[str]:
    models = httpx.get(f"{server.url}/health", timeout=10).json()["models"]
    return {name for name, state in models.items() if state == "ready"}
