"""Generate jobs of different users queued together run in one continuous batch on the
server (runtime/decode_batch.py through the worker): each one's tokens and saves equal
the same generation run alone locally, and the server counts the shared steps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import nnglass
from nnglass import LanguageModel

TINY = "tiny"


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=TINY)


def _generate(lm: LanguageModel, prompt: str, n: int, scale: float, remote: bool, **kwargs: Any) -> Any:
    with lm.generate(prompt, max_new_tokens=n, remote=remote, blocking=not remote, **kwargs) as tracer:
        with tracer.all():
            lm.model.layers[0].output[:] += scale
            logits = lm.output.logits.save()
        result = tracer.result.save()
    return tracer, logits, result


def test_queued_generations_share_one_batch_and_equal_their_lone_runs(
    start_server: Any, tiny_config: Any, lm: LanguageModel
) -> None:
    # A pass waits up to 0.5 s for each next job to arrive: the three sent one after the
    # other are taken together.
    server = start_server("generation-batch", tiny_config().replace(
        "[models.policy.limits]", "share_wait_s = 0.5\n[models.policy.limits]"))
    try:
        _, key = server.keys.create("alice")
        nnglass.configure(host=server.url, api_key=key)
        jobs = [("hi", 5, 0.3, {}), ("a much longer prompt", 3, -0.2, {}),
                ("sampled", 6, 0.1, {"do_sample": True, "seed": 3, "top_k": 10})]
        remote = [_generate(lm, p, n, s, True, **kw) for p, n, s, kw in jobs]
        for (prompt, n, scale, kw), (tracer, logits, result) in zip(jobs, remote):
            tracer.job.wait(timeout=60)
            _, local_logits, local_result = _generate(lm, prompt, n, scale, False, **kw)
            assert torch.equal(result.value, local_result.value)
            assert len(logits.value) == len(local_logits.value)
            for a, b in zip(logits.value, local_logits.value):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        shared = re.search(r"nnglass_shared_jobs_total (\d+)", metrics)
        assert shared is not None and int(shared.group(1)) == 3, metrics
        steps = re.search(r'nnglass_generation_step_rows_count\{model="tiny"\} (\d+)', metrics)
        assert steps is not None and int(steps.group(1)) >= 6, metrics  # the longest: 6 forwards
    finally:
        nnglass.configure(host="http://127.0.0.1:8321", api_key="")
        server.stop()
