"""The OpenAI endpoints' test server, shared by test_provider.py and test_streaming.py: the
tests' tiny Llama with a chat template, served as "provider" under the shipped provider
policy (weights hidden, reads and writes limited to the blocks and the root's output).

Its workers run with the step gate (NNGLASS_WORKER_TEST_GATE, server/worker.py): while
`Provider.gate` exists, every generation step waits after its step line, so a test can
look at a stream (and the job) while the job is still RUNNING. `held(provider)` holds it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import transformers
from test_exposure import PROVIDER, model_toml

from nnglass.server.worker import TEST_GATE

SERVER = """[server]
host = "127.0.0.1"
port = PORT
home = "HOME"
max_request_bytes = 8000000
max_queued_per_key = 8

"""
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@dataclass
class Provider:
    server: Any  # service_fixtures.Server
    key: str
    client: openai.OpenAI
    gate: Path  # exists: every generation step waits


@contextmanager
def held(provider: Provider) -> Iterator[None]:
    provider.gate.touch()
    try:
        yield
    finally:
        provider.gate.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def chat_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_dir, folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def provider(start_server: Callable[..., Any], chat_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    gate = tmp_path_factory.mktemp("step-gate") / "gate"
    with pytest.MonkeyPatch.context() as mp:  # the server, and so its workers, inherit it
        mp.setenv(TEST_GATE, str(gate))
        server = start_server("openai", SERVER + model_toml("provider", chat_dir, PROVIDER))
    key = server.keys.create("openai-tests")[1]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
    yield Provider(server, key, client, gate)
    gate.unlink(missing_ok=True)
    server.stop()
