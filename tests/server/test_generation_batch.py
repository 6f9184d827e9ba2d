"""Generate jobs of different users queued together run in one continuous batch on the
server (runtime/decode_batch.py through the worker): each one's tokens and saves equal
the same generation run alone locally, and the server counts the shared steps."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import nnglass
from nnglass import LanguageModel, _config

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


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_config: Any) -> Iterator[Any]:
    # A pass waits up to 0.5 s for each next job to arrive: jobs sent one after the other
    # are taken together. A batch holds at most 4 jobs.
    server = start_server("generation-batch", tiny_config().replace(
        "[models.policy.limits]", "share_wait_s = 0.5\nshare_jobs = 4\n[models.policy.limits]"))
    yield server
    server.stop()


@pytest.fixture
def key(server: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    _, key = server.keys.create(request.node.name[:40])
    with pytest.MonkeyPatch.context() as mp:  # the process's settings as they were, after
        mp.setattr(_config, "_overrides", {})
        nnglass.configure(host=server.url, api_key=key)
        yield key


def _stats(server: Any, key: str) -> dict[str, Any]:
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    return next(m for m in models if m["name"] == TINY)["batching"]


def test_queued_generations_share_one_batch_and_equal_their_lone_runs(
    server: Any, key: str, lm: LanguageModel
) -> None:
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
    assert shared is not None and int(shared.group(1)) >= 3, metrics
    steps = re.search(r'nnglass_generation_step_rows_count\{model="tiny"\} (\d+)', metrics)
    assert steps is not None and int(steps.group(1)) >= 6, metrics  # the longest: 6 forwards
    assert _stats(server, key)["mean_rows_per_step"] > 1


def _until(job: Any, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while job.status() != status:
        assert time.monotonic() < deadline, f"{job} never became {status}"
        time.sleep(0.01)


def test_jobs_join_a_running_generation_and_leave_alone(server: Any, key: str, lm: LanguageModel) -> None:
    """A long generation runs; a second generate job joins it mid-flight and ends first, a
    third is cancelled mid-generation, a fourth fails at its step 2, and a trace runs
    between two steps: each ends as it would alone, the long one unchanged by them all."""
    before = _stats(server, key)["generation_steps"]
    slow = torch.ones(384, 384)

    def long_body(t: Any) -> Any:
        with t.all():
            x = lm.model.layers[0].output.sum() * 0 + slow
            for _ in range(6):  # a slow step (the joiners arrive while it runs)
                x = x @ slow / 384
            lm.model.layers[0].output[:] += x.mean() * 1e-3
        return t.result.save()

    with lm.generate("the long one", max_new_tokens=64, min_new_tokens=64, remote=True,
                     blocking=False) as long:
        result = long_body(long)
    _until(long.job, "RUNNING")
    joiner, joiner_logits, joiner_result = _generate(lm, "joins", 4, 0.2, True)
    with lm.generate("cancelled", max_new_tokens=64, min_new_tokens=64, remote=True,
                     blocking=False) as cancelled:
        cancelled.result.save()
    with lm.generate("fails", max_new_tokens=5, remote=True, blocking=False) as failing:
        with failing.step(2):
            lm.model.layers[0].output[:, 40].save()  # out of range at its step 2
    with lm.trace("a small trace", remote=True, blocking=False) as small:
        small_logits = lm.output.logits.save()
    _until(cancelled.job, "RUNNING")
    assert cancelled.job.cancel() == "CANCELLED"
    joiner.job.wait(timeout=60)
    small.job.wait(timeout=60)
    with pytest.raises(nnglass.ExecutionError, match="index 40"):
        failing.job.wait(timeout=60)
    long.job.wait(timeout=120)
    assert long.job.info["started_at"] < joiner.job.info["started_at"]
    assert joiner.job.info["finished_at"] < long.job.info["finished_at"]  # left at its own end
    assert small.job.info["finished_at"] < long.job.info["finished_at"]  # between two steps
    assert cancelled.job.status() == "CANCELLED"
    with lm.generate("the long one", max_new_tokens=64, min_new_tokens=64) as local:
        local_result = long_body(local)
    assert torch.equal(result.value, local_result.value)
    _, local_logits, local_joiner = _generate(lm, "joins", 4, 0.2, False)
    assert torch.equal(joiner_result.value, local_joiner.value)
    for a, b in zip(joiner_logits.value, local_logits.value, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with lm.trace("a small trace"):
        local_small = lm.output.logits.save()
    torch.testing.assert_close(small_logits.value, local_small.value, atol=1e-4, rtol=1e-4)
    assert _stats(server, key)["generation_steps"] >= before + 64


def test_a_trace_runs_between_the_steps_of_a_full_batch(server: Any, key: str, lm: LanguageModel) -> None:
    """Four long generations fill the batch; a fifth generate job waits for a place, but a
    small trace sent after it (by another key) runs between two steps, long before the
    generations end, with the result it gets alone."""
    slow = torch.ones(384, 384)

    def long_one(prompt: str, steps: int) -> Any:
        with lm.generate(prompt, max_new_tokens=48, min_new_tokens=48, remote=True, blocking=False) as t:
            with t.all():
                x = lm.model.layers[0].output.sum() * 0 + slow
                for _ in range(steps):  # a slow step
                    x = x @ slow / 384
                lm.model.layers[0].output[:] += x.mean() * 1e-3
            t.result.save()
        return t

    longs = [long_one(f"long {i}", 8 if i == 0 else 0) for i in range(4)]
    for t in longs:
        _until(t.job, "RUNNING")
    waiting = long_one("the fifth", 0)
    nnglass.configure(api_key=server.keys.create("another key")[1])
    with lm.trace("a small trace", remote=True, blocking=False) as small:
        small_logits = lm.output.logits.save()
    small.job.wait(timeout=60)
    for t in [*longs, waiting]:
        t.job.wait(timeout=120)
    ended = min(t.job.info["finished_at"] for t in longs)
    assert small.job.info["finished_at"] < ended  # it did not wait for a place in the batch
    assert waiting.job.info["started_at"] >= ended  # the full batch took no generate job
    with lm.trace("a small trace"):
        local = lm.output.logits.save()
    torch.testing.assert_close(small_logits.value, local.value, atol=1e-4, rtol=1e-4)


def test_a_worker_of_whole_requests_serves_a_session_group_by_group() -> None:
    """`stream_by_batches` (a Ray actor's sessions): each admitted group is one request,
    its answers go to `on_step`, and a request that comes back without an answer per job
    ends the session as lost."""
    from nnglass.server.generation import stream_by_batches

    class Whole:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def run(self, request: dict[str, Any], timeout: float | None = None,
                on_step: Any = None) -> dict[str, Any]:  # (the Worker protocol's run)
            self.sent.append(request)
            if "batch" not in request:
                return {"job": request["job"], "status": "COMPLETED"}
            if any(r["job"] == "dies" for r in request["batch"]):
                return {"status": "ERROR", "error": {"type": "crash"}}
            return {"batch": [{"job": r["job"], "status": "COMPLETED"} for r in request["batch"]]}

    seen: list[list[str]] = []
    replies = iter([{"more": [{"job": "c"}, {"job": "d"}]}, {"more": [{"job": "e"}], "drop": ["e"]}])

    def on_step(message: dict[str, Any]) -> dict[str, Any]:
        seen.append([a["job"] for a in message["answers"]])
        assert message["running"] == 0
        return next(replies)

    worker = Whole()
    assert stream_by_batches(worker, [{"job": "a"}, {"job": "b"}], on_step, 1.0) is None
    assert seen == [["a", "b"], ["c", "d"]]  # "e" was dropped before it ran
    assert [list(r) for r in worker.sent] == [["batch"], ["batch"]]
    lost = stream_by_batches(Whole(), [{"job": "x"}, {"job": "dies"}], on_step, 1.0)
    assert lost is not None and lost["status"] == "ERROR"
