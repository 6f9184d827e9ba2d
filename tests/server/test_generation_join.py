"""Generate jobs that arrive while a generation runs join it together: at the step
boundary they share one prompt forward, within the model's `join_tokens` (the rest join at
the next steps), a trace queued with them runs by that same boundary, other jobs run
beside the batch even while a step is held (server/beside.py), and every job's result is
the one it gets alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nnglass import LanguageModel
from nnglass.server.worker import TEST_GATE
from service_fixtures import (
    TERMINAL,
    TINY,
    assert_as_alone,
    recording,
    slow_graph,
    small_graph,
    submit,
    wait_for,
)


def _generation(lm: LanguageModel, prompt: str, n: int) -> Any:
    with recording(lm.generate(prompt, max_new_tokens=n, min_new_tokens=n)) as tracer:
        with tracer.all():
            lm.model.layers[0].output[:] += 0.1
        tracer.result.save()
    return tracer.graph


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=TINY)


@pytest.fixture(scope="module")
def gated(start_server: Callable[..., Any], tiny_config: Callable[..., str], lm: LanguageModel,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """A server whose generation steps wait while the gate file exists (fault_hooks.TEST_GATE);
    two prompts of 4 tokens fit in one step's prompt forward, three do not."""
    gate = tmp_path_factory.mktemp("join-gate") / "gate"
    width = len(lm.tokenizer("abcd")["input_ids"])
    with pytest.MonkeyPatch.context() as mp:  # the server, and so its worker, inherit it
        mp.setenv(TEST_GATE, str(gate))
        server = start_server("generation-join", tiny_config().replace(
            "[models.policy.limits]", f"join_tokens = {2 * width}\n[models.policy.limits]"))
    yield server, gate
    gate.unlink(missing_ok=True)
    server.stop()


def _prefills(server: Any, key: str) -> tuple[float, float]:
    labels = f'{{model="{TINY}"}}'
    return (server.metric(key, f"nnglass_generation_prefill_rows_count{labels}"),
            server.metric(key, f"nnglass_generation_prefill_rows_sum{labels}"))


def test_joiners_share_a_prompt_forward_within_the_budget(gated: tuple[Any, Path], lm: LanguageModel) -> None:
    server, gate = gated
    keys = [server.keys.create(f"joiner{i}")[1] for i in range(5)]
    clients = [server.client(k) for k in keys]
    try:
        before = _prefills(server, keys[0])
        long = _generation(lm, "the long one", 12)
        gate.touch()  # the long generation's first step waits until the others are queued
        first = submit(clients[0], long)
        wait_for(clients[0], first, ("RUNNING",))
        joiners = [_generation(lm, p, 4) for p in ("abcd", "efgh", "ijkl")]
        ids = [submit(c, g) for c, g in zip(clients[1:4], joiners)]
        with recording(lm.trace("a small trace")) as trace:
            lm.output.logits.save()
        small = submit(clients[4], trace.graph)
        gate.unlink()
        for c, job, g in [(clients[0], first, long), *zip(clients[1:4], ids, joiners), (clients[4], small,
                                                                                       trace.graph)]:
            assert_as_alone(c, job, lm, g)
        count, rows = (a - b for a, b in zip(_prefills(server, keys[0]), before))
        # The long one alone; two joiners together (the budget), the third at the next step.
        assert (count, rows) == (3, 4)
        ended = [wait_for(c, j) for c, j in zip(clients, [first, *ids, small])]
        assert ended[4]["finished_at"] < min(e["finished_at"] for e in ended[:4])  # between steps
    finally:
        gate.unlink(missing_ok=True)
        for c in clients:
            c.close()


def _first_step(server: Any, key: str, job: str) -> None:
    """Returns once the job has made its first step (its worker now holds it at the gate)."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job}/events?steps=true", headers=auth, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: step"):
                return
    raise AssertionError(f"job {job} ended without a step")


def test_jobs_beside_a_held_step_end_before_it_as_alone(gated: tuple[Any, Path], lm: LanguageModel) -> None:
    """While a generation's step is held (the gate), traces sent meanwhile run beside the
    batch: one completes before the step is let go, with the result it gets alone; one
    that fails ends ERROR alone; one cancelled while it runs stays CANCELLED, and the
    next trace still runs beside the held step. The generation is its lone run, and the
    worker never restarts."""
    server, gate = gated
    keys = [server.keys.create(f"beside{i}")[1] for i in range(4)]
    clients = [server.client(k) for k in keys]
    pid = server.worker_pid(TINY)
    try:
        gen = _generation(lm, "held", 4)
        gate.touch()
        first = submit(clients[0], gen)
        _first_step(server, keys[0], first)
        small = small_graph(lm, "a small trace")
        with recording(lm.trace("a failing trace")) as failing:
            lm.model.layers[0].output[:, 40].save()  # out of range: fails when it runs
        ok, bad = submit(clients[1], small), submit(clients[2], failing.graph)
        assert wait_for(clients[2], bad)["status"] == "ERROR"
        assert_as_alone(clients[1], ok, lm, small)
        slow = submit(clients[3], slow_graph(lm))
        wait_for(clients[3], slow, ("RUNNING",))
        assert clients[3].delete(f"/v1/jobs/{slow}").json()["status"] == "CANCELLED"
        after = submit(clients[1], small)
        assert_as_alone(clients[1], after, lm, small)  # the lane went on
        assert gate.exists() and wait_for(clients[0], first, ("RUNNING", *TERMINAL))["status"] == "RUNNING"
        gate.unlink()
        assert_as_alone(clients[0], first, lm, gen)
        assert wait_for(clients[3], slow)["status"] == "CANCELLED"
        assert server.worker_pid(TINY) == pid
    finally:
        gate.unlink(missing_ok=True)
        for c in clients:
            c.close()
