"""Shared fixtures for the service tests (tests/server, tests/fuzz, tests/faults): a tiny
model on disk, a real server on loopback (on either store combination), the graphs they
submit, and the client side (post, submit, wait_for, assert_as_alone). Each conftest that
needs the fixtures imports them by name."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

import nnglass
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from nnglass.server.auth import KeyStore
from nnglass.server.config import load_config
from nnglass.server.jobs import SQLiteJobStore
from nnglass.server.pg import Database
from nnglass.server.pg_stores import PgJobStore
from nnglass.server.stores import open_keys
from saved_values import assert_bitwise_equal  # tests/saved_values.py

TINY = "tiny"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 32, vocab 100) and a char-level tokenizer, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    ).save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder

@pytest.fixture(scope="session")
def pg_database(postgres: Any) -> Iterator[Database]:
    """One pool on one database of the session's PostgreSQL (tests/components.py)."""
    db = Database(postgres.fresh_database())
    yield db
    db.close()


@pytest.fixture
def pg_clean(pg_database: Database) -> Database:
    """`pg_database` with every table emptied: each test starts from nothing."""
    with pg_database.tx() as conn:
        conn.execute("TRUNCATE jobs, api_keys, queue, queue_turns, queue_clock, frontends, small_objects")
    return pg_database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_stores(config_text: str, stores: dict[str, str] | None) -> str:
    """The config with `[server] database` and `results` set (None: the embedded default)."""
    if not stores:
        return config_text
    lines = "".join(f'{k} = "{v}"\n' for k, v in stores.items() if v)
    assert "[server]\n" in config_text
    return config_text.replace("[server]\n", "[server]\n" + lines, 1)


class Server:
    """`nnglass serve --config` in a subprocess on a random loopback port. `stores`: the
    `[server] database` and `results` it uses (None: SQLite and a folder in `home`)."""

    def __init__(self, home: Path, config_text: str, cwd: Path | None = None,
                 env: dict[str, str] | None = None, stores: dict[str, str] | None = None) -> None:
        self.home = home
        self.cwd = cwd  # the server's working directory (default: this process's)
        self.env = dict(env or {})  # added to this process's environment
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = home / "server.toml"
        text = with_stores(config_text, stores).replace("PORT", str(self.port)).replace("HOME", str(home))
        self.config.write_text(text)
        self.stores = stores
        self.keys = open_keys(load_config(self.config)) if stores else KeyStore(home / "nnglass.db")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0, models_ready: bool = True) -> None:
        """Start the server; wait until it answers (and, with `models_ready`, every model is ready)."""
        env = {**os.environ, **self.env, "NNGLASS_HOME": str(self.home)}
        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nnglass", "serve", "--config", str(self.config)],
                                     env=env, stdout=log, stderr=log, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                models = httpx.get(f"{self.url}/health", timeout=2).json()["models"]
                if models and (not models_ready or all(s == "ready" for s in models.values())):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        path = self.home / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def client(self, key: str | None) -> httpx.Client:
        """An HTTP client for this server, sending `key` as the bearer token (None: no key)."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def metric(self, key: str, name: str) -> float:
        """The value of one line of `/metrics` (`name` with its labels), 0 when absent."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
        for line in text.splitlines():
            metric, _, value = line.rpartition(" ")
            if metric == name:
                return float(value)
        return 0.0

    def job(self, job_id: str) -> Any:
        """The job's row (a jobs.Job, None if none), read from the server's own job store."""
        if not self.stores:
            with SQLiteJobStore(self.home / "nnglass.db") as store:
                return store.get(job_id)
        db = Database(self.stores["database"], max_size=1)
        try:
            return PgJobStore(db).get(job_id)
        finally:
            db.close()

    def worker_pid(self, model: str) -> int:
        """The pid of the worker that serves `model` now (the server logs each start)."""
        text = (self.home / "server.log").read_text(errors="replace")
        pids = re.findall(rf"worker for model '{re.escape(model)}' ready \(pid (\d+)\)", text)
        assert pids, f"no worker for {model!r} in the log:\n{self.log()}"
        return int(pids[-1])


def server_toml(tiny_dir: Path, run_seconds: float = 20, extra_model: str = "") -> str:
    return f"""
[server]
host = "127.0.0.1"
port = PORT
home = "HOME"
result_ttl_s = 3600
max_request_bytes = 8000000
debug_checksums = true
max_queued_per_key = 8

[[models]]
name = "{TINY}"
source = "{tiny_dir}"
threads = {torch.get_num_threads()}  # as this process: bitwise-equal local and remote runs

[models.policy.limits]
run_seconds = {run_seconds}
new_tokens = 64
{extra_model}
"""


@dataclass(frozen=True)
class Engine:
    """Where a test server runs its replicas: "subprocess" (the embedded default) or "ray"
    (the session's two-node cluster, tests/ray_cluster.py)."""

    name: str
    cluster: Any = None  # ray_cluster.RayCluster for "ray"

    def config(self, text: str) -> str:
        return text if self.cluster is None else self.cluster.server_toml(text)

    @property
    def env(self) -> dict[str, str]:
        return {} if self.cluster is None else self.cluster.env


SUBPROCESS = Engine("subprocess")


@dataclass(frozen=True)
class Backend:
    """A combination of engine and stores a test server runs on (issue 10's matrix):
    "embedded" (subprocess workers, SQLite and a folder in the server's home) or
    "cluster" (Ray actors on the session's two-node cluster, the session's PostgreSQL
    and S3). `stores()` is a fresh database and bucket each call, so two servers of one
    module never share a queue unless a test hands one's stores to the other."""

    name: str
    engine: Engine = SUBPROCESS
    postgres: Any = None  # components.Postgres for "cluster"
    s3: Any = None  # components.S3Server for "cluster"

    def stores(self) -> dict[str, str] | None:
        if self.postgres is None:
            return None
        return {"database": self.postgres.fresh_database(), "results": self.s3.url()}


EMBEDDED = Backend("embedded")
# A test (or a module, as `pytestmark`) marked so runs on both (tests/server/conftest.py).
ON_BOTH_BACKENDS = pytest.mark.backends("embedded", "cluster")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """`start_server(name, config_text, home=None, cwd=None, engine=SUBPROCESS, stores=None,
    backend=None)`: a started Server in a new temporary home (or `home`), its replicas
    where `engine` runs them, its jobs and results in `stores` (None: the embedded
    default). `backend` (a Backend) gives both: its engine, and fresh stores unless
    `stores` names some. Callers stop theirs; whatever is left stops at the end."""
    started: list[Server] = []

    def start(name: str, config_text: str, home: Path | None = None, cwd: Path | None = None,
              engine: Engine = SUBPROCESS, stores: dict[str, str] | None = None,
              backend: Backend | None = None) -> Server:
        if backend is not None:
            engine, stores = backend.engine, stores if stores is not None else backend.stores()
        home = home if home is not None else tmp_path_factory.mktemp(name)
        server = Server(home, engine.config(config_text), cwd=cwd, env=engine.env, stores=stores)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path) -> Callable[..., str]:
    """`server_toml` for the tiny model: `tiny_config(run_seconds=20, extra_model="")`."""

    def text(run_seconds: float = 20, extra_model: str = "") -> str:
        return server_toml(tiny_dir, run_seconds, extra_model)

    return text


# --- graphs the service tests submit ------------------------------------------------------


@contextmanager
def recording(block: Any) -> Iterator[Any]:
    """A trace (or session) block whose graph is kept, never run: it goes to a
    `nnglass.Recorder` instead of the model's backend."""
    block.backend = nnglass.Recorder()
    with block:
        yield block


def small_graph(lm: Any, prompt: str = "hi") -> Any:
    """A trace of `prompt` saving layer 0's output."""
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output.save()
    return tracer.graph


def slow_graph(lm: Any, n: int = 2000, k: int = 8) -> Any:
    """A job that keeps the worker busy for a second or two (k products of n x n matrices)."""
    with recording(lm.trace("hi")) as tracer:
        m = lm.model.layers[0].output.sum().expand(n, n).contiguous()
        for _ in range(k):
            m = m @ m
        m.sum().save()
    return tracer.graph


PROMPTS = ["hello there", "goodbye you", "how are you", "whats up yo"]  # one padded width: one pass


def record(lm: Any, prompt: str = PROMPTS[0]) -> Any:
    """A forward-only graph that reads and writes (so a wrong row or a lost setter shows)."""
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output[:, -1] = 0
        lm.model.layers[1].output.save()
        lm.output.logits[:, -1].save()
    return tracer.graph


# --- the client side: submitting and waiting as a client does ---------------------------

TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")


def post(http: httpx.Client, graph: Any) -> httpx.Response:
    """Submit a graph as the client does (multipart when it carries tensors, as the token
    ids of a recorded trace are)."""
    json_bytes, tensors = wire.encode(graph)
    if tensors is None:
        return http.post("/v1/jobs", content=json_bytes, headers={"Content-Type": "application/json"})
    files = {"graph": ("graph.json", json_bytes, "application/json"),
             "tensors": ("t.safetensors", tensors, "application/octet-stream")}
    return http.post("/v1/jobs", files=files)


def submit(http: httpx.Client, graph: Any) -> str:
    """The accepted job's id (a 202, else the test fails with the answer)."""
    r = post(http, graph)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_for(http: httpx.Client, job: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 120.0,
             *, unavailable_ok: bool = False) -> dict[str, Any]:
    """The job's record once its status is one of `statuses`; any answer but a 200 fails,
    except, with `unavailable_ok`, a 503 with Retry-After (a database coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/jobs/{job}")
        if unavailable_ok and r.status_code == 503:
            assert "Retry-After" in r.headers, r.text
        else:
            assert r.status_code == 200, r.text
            info = r.json()
            if info["status"] in statuses:
                return dict(info)
        assert time.monotonic() < deadline, f"job still {r.status_code} {r.text[:300]} after {timeout} s"
        time.sleep(0.05)


def assert_as_alone(http: httpx.Client, job: str, lm: Any, graph: Any, *,
                    unavailable_ok: bool = False) -> None:
    """The job completed, and its saved values are bitwise what the graph gives run alone."""
    info = wait_for(http, job, unavailable_ok=unavailable_ok)
    assert info["status"] == "COMPLETED", info
    assert_bitwise_equal(decode_results(http.get(f"/v1/jobs/{job}/result").content), lm.run_graph(graph))
