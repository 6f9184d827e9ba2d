"""Shared fixtures for the service tests: a tiny model on disk, a real server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from nnglass.server.auth import KeyStore

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
    ).save_pretrained(folder)  # fmt: skip
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nnglass serve --config` in a subprocess on a random loopback port."""

    def __init__(self, home: Path, config_text: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = home / "server.toml"
        self.config.write_text(config_text.replace("PORT", str(self.port)).replace("HOME", str(home)))
        self.keys = KeyStore(home / "nnglass.db")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        env = {**os.environ, "NNGLASS_HOME": str(self.home)}
        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nnglass", "serve", "--config", str(self.config)],
                                     env=env, stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                models = httpx.get(f"{self.url}/health", timeout=2).json()["models"]
                if models and all(s == "ready" for s in models.values()):
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
threads = 1

[models.policy.limits]
run_seconds = {run_seconds}
new_tokens = 64
{extra_model}
"""
