"""A real server in this process, for the faults a test injects from inside: the service's
own clock, its result store, its event hub. `create_app` under uvicorn on a loopback port
(real sockets: a client can go away mid-stream), its replicas `ThreadWorker`s — worker.py's
`LoadedModel` and `answer`, the replica itself, in the replica's thread instead of a
subprocess (another `Worker`, as `RayWorker` is: the service never asks which)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from nnglass.server.app import create_app
from nnglass.server.config import ModelConfig, ServerConfig, load_config
from nnglass.server.generation import run_session
from nnglass.server.replica import Replica
from nnglass.server.service import Service
from nnglass.server.worker import LoadedModel, answer, ready_message
from service_fixtures import free_port


class ThreadWorker:
    """The `Worker` protocol over a model loaded in this process. It cannot be stopped
    mid-job (a cancel lets the job finish; its answer is dropped). A request waits for
    `gate` (the test clears it to hold a job RUNNING)."""

    def __init__(self, model: ModelConfig, server: ServerConfig, gate: threading.Event) -> None:
        self.gate = gate
        self.config = {"name": model.name, "source": model.source, "dtype": model.dtype,
                       "threads": model.threads, "debug_checksums": server.debug_checksums}
        self.replica: LoadedModel | None = None
        self.paths: list[str] = []
        self.ready: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self.replica is not None

    def start(self, timeout: float = 300.0) -> None:
        self.replica = LoadedModel(self.config)
        self.ready = ready_message(self.replica)
        self.paths = list(self.ready["paths"])

    def run(self, request: dict[str, Any], timeout: float | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        assert self.replica is not None
        self.gate.wait()
        return answer(self.replica, request, on_step)  # step lines straight to the service

    def stream(self, requests: list[dict[str, Any]], on_step: Callable[[dict[str, Any]], dict[str, Any]],
               timeout: float, on_line: Callable[[dict[str, Any]], None] | None = None,
               beside: Any = None) -> None:
        """A generation session in this thread: worker.py's session, its messages straight
        to the replica's `on_step`; no lane, so other jobs run between two steps (`beside`
        is never asked)."""
        assert self.replica is not None
        self.gate.wait()
        run_session(self.replica, requests, on_step, on_line)

    def stop_job(self, job: Any) -> bool:
        return False

    def kill(self) -> None:
        self.replica = None


@dataclass
class Live:
    service: Service
    url: str
    key: str
    gate: threading.Event  # cleared: the worker holds the job it has

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)


@contextmanager
def unstarted(home: Path, config_text: str,
              model: str = "tiny") -> Iterator[tuple[Service, Replica, ThreadWorker]]:
    """The service `config_text` describes, in this process and not started (no replica
    threads, no upkeep), with one replica of `model` on a `ThreadWorker`, its model loaded:
    a test drives the replica's steps itself."""
    path = home / "server.toml"
    path.write_text(config_text.replace("PORT", "0").replace("HOME", str(home)))
    config = load_config(path)
    gate = threading.Event()
    gate.set()
    service = Service(config, worker=lambda model, server: ThreadWorker(model, server, gate))
    try:
        state = service.models[model]
        worker = ThreadWorker(state.config, config, gate)
        replica = Replica(service, state, worker)
        assert replica._start()  # the model loaded: what a graph may name is known
        yield service, replica, worker
    finally:
        service.stop()


@contextmanager
def live(home: Path, config_text: str) -> Iterator[Live]:
    """The server `config_text` describes (service_fixtures.server_toml), in this process,
    until the block ends; one API key."""
    port = free_port()
    path = home / "server.toml"
    path.write_text(config_text.replace("PORT", str(port)).replace("HOME", str(home)))
    config = load_config(path)
    gate = threading.Event()
    gate.set()
    service = Service(config, worker=lambda model, server: ThreadWorker(model, server, gate))
    server = uvicorn.Server(uvicorn.Config(create_app(config, service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="live-uvicorn")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["models"].get("tiny") == "ready":
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "the live server did not start"
        time.sleep(0.05)
    try:
        yield Live(service, url, service.keys.create("alice")[1], gate)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
