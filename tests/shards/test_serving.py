"""A server whose model says `shards = 2` serves remote jobs from a rank group, giving what
the unsharded model gives (1e-5). (Co-tenant jobs on a rank group: test_tiny.py, whose
session group they share.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import nnglass
from nnglass import _config
from nnglass.server.config import ModelConfig, ServerConfig
from nnglass.server.engines import subprocess_worker

TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_the_subprocess_engine_passes_shards_to_the_worker() -> None:
    worker = subprocess_worker(ModelConfig(name="m", source="s", shards=3), ServerConfig())
    assert worker.config["shards"] == 3


def test_a_server_serves_remote_jobs_from_a_sharded_model(start_server: Any, tiny_config: Any,
                                                          tiny_alone: Any) -> None:
    text = tiny_config().replace("threads =", "shards = 2\nthreads =", 1)
    server = start_server("sharded", text)
    try:
        _, key = server.keys.create("alice")
        lm = tiny_alone
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_config, "_overrides", {})
            nnglass.configure(host=server.url, api_key=key)
            with lm.trace("Hello world", remote=True):
                lm.model.layers[0].mlp.down_proj.input[:, -1] = 3.0
                q = lm.model.layers[1].self_attn.q_proj.output.save()
                logits = lm.output.logits.save()
        with lm.trace("Hello world"):
            lm.model.layers[0].mlp.down_proj.input[:, -1] = 3.0
            q_ref = lm.model.layers[1].self_attn.q_proj.output.save()
            logits_ref = lm.output.logits.save()
        torch.testing.assert_close(q.value, q_ref.value, **TOL)
        torch.testing.assert_close(logits.value, logits_ref.value, **TOL)
    finally:
        server.stop()
