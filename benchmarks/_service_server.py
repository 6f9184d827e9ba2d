"""The server under test in ``service.py``: the tiny model it serves, the process, and its handle.

    python benchmarks/_service_server.py server.toml      (what ``Server`` starts)

The process runs exactly what ``nnglass serve --config`` runs (``create_app(load_config(path))``
under ``uvicorn.run`` with the same host, port and log level), with one ASGI dispatcher in front:
``GET /static/<job id>`` is answered by a bare Starlette app with a ``FileResponse`` of that job's
result file, without nnglass's routes or middleware; every other request (and the lifespan) goes to
nnglass. So both downloads of the throughput comparison come from the same process, event loop,
uvicorn/h11 stack and file (same page cache); only nnglass's own work per download differs.
``GET /static-mw/<job id>`` is the same FileResponse behind a pass-through ``BaseHTTPMiddleware``
(what nnglass's ``@app.middleware("http")`` key check installs), to price that layer alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from nnglass.server.auth import KeyStore

TOML = """[server]
host = "127.0.0.1"
port = {port}
home = "{home}"

[[models]]
name = "tiny"
source = "{model}"
threads = 1

[models.policy.limits]
result_bytes = {result_bytes}
"""


def save_tiny(folder: Path) -> None:
    """tests/service_fixtures.py's `tiny_dir`: a random 2-layer Llama and a char-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)



def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    """Return once every model the server at `url` serves is ready; if the server dies or
    `seconds` pass first, kill it and exit with the tail of its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if all(s == "ready" for s in httpx.get(f"{url}/health").json()["models"].values()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise SystemExit("server not ready:\n" + log.read_text(errors="replace")[-3000:])

class Server:
    """This file as a process on a free loopback port with home `home` (its own NNGLASS_HOME);
    `key` is a fresh key made with KeyStore, `http` a client that sends it."""

    def __init__(self, home: Path, model: Path, result_bytes: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.home, self.url = home, f"http://127.0.0.1:{port}"
        toml = home / "server.toml"
        toml.write_text(TOML.format(port=port, home=home, model=model, result_bytes=result_bytes))
        with KeyStore(home / "nnglass.db") as keys:
            _, self.key = keys.create("bench")
        with open(home / "server.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, str(toml)], stdout=log, stderr=log,
                                         env={**os.environ, "NNGLASS_HOME": str(home)})
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                 timeout=60.0)
        wait_ready(self.url, self.proc, home / "server.log", 300)

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve(path: str) -> None:
    import logging

    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse
    from starlette.routing import Route

    from nnglass.server.app import create_app
    from nnglass.server.config import load_config
    from nnglass.server.results import DirResultStore, check_job_id

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(path)
    nnglass = create_app(config)
    results = DirResultStore(config.home / "jobs")  # the layout the service itself uses

    async def static(request: Request) -> FileResponse:
        job_id = check_job_id(request.path_params["job_id"])
        return FileResponse(results.result_path(job_id), media_type="application/octet-stream")

    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    plain = Starlette(routes=[Route("/static/{job_id}", static)])
    wrapped = Starlette(routes=[Route("/static-mw/{job_id}", static)],
                        middleware=[Middleware(BaseHTTPMiddleware, dispatch=passthrough)])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = scope["path"].split("/")[1] if scope["type"] == "http" else ""
        await {"static": plain, "static-mw": wrapped}.get(first, nnglass)(scope, receive, send)

    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    serve(sys.argv[1])
