"""server/steps.py on its own: the worker's step lines keep within their byte budget, and the
server's log is bounded, read by cursor, and says when a reader has missed something."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from nnglass.graph.results import decode_results, encode_results
from nnglass.server import steps
from nnglass.server.steps import StepLog, step_sender


def test_step_lines_carry_values_within_the_budget_then_only_tokens() -> None:
    sent: list[dict] = []
    row = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    budget = len(encode_results({5: [row]})) * 5 // 2  # two steps' values fit, not three
    on_step = step_sender("j", lambda m: sent.append(json.loads(json.dumps(m))), budget=budget)
    for k in range(4):
        on_step(k, torch.tensor([[k + 3]]), {5: [row * k]})
    on_step(4, torch.tensor([[9]]), {})
    with_values = [m for m in sent if "values" in m]
    assert with_values and all(m["job"] == "j" for m in sent)
    for m in with_values:
        assert torch.equal(decode_results(base64.b64decode(m["values"]))[5][0], row * m["step"])
    assert [m["step"] for m in with_values] == [0, 1]
    assert all(m.get("dropped") for m in sent[2:4])  # over the budget, and once dropped, dropped
    assert [m["tokens"] for m in sent] == [[[3]], [[4]], [[5]], [[6]], [[9]]]
    assert "values" not in sent[4] and "dropped" not in sent[4]  # nothing saved that step


def test_a_step_too_big_is_dropped_before_it_is_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "encode_results", lambda *_: pytest.fail("encoded a step over the limit"))
    sent: list[dict] = []
    big = torch.zeros(steps.MAX_STEP_BYTES // 4 + 1)
    step_sender("j", sent.append, budget=2**40)(0, torch.tensor([[1]]), {1: big})
    assert sent[0].get("dropped") and "values" not in sent[0]


def line(job: str, k: int, data: bytes = b"") -> dict:
    out = {"job": job, "step": k, "tokens": [[k]]}
    return {**out, "values": base64.b64encode(data).decode()} if data else out


def test_the_log_is_read_by_cursor_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    woken: list[str] = []
    log = StepLog(woken.append)
    assert log.read("a", -1).steps == [] and not log.read("a", -1).gap  # not started (or elsewhere)
    for k in range(3):
        log.add(line("a", k))
    assert [s.step for s in log.read("a", -1).steps] == [0, 1, 2]
    assert [s.step for s in log.read("a", 1).steps] == [2] and not log.read("a", 1).ended
    assert woken == ["a"] * 3
    monkeypatch.setattr(steps, "JOB_STEPS", 4)
    for k in range(3, 8):
        log.add(line("a", k))
    assert log.read("a", -1).gap  # steps 0..3 are gone: this reader reads the result
    assert [s.step for s in log.read("a", 3).steps] == [4, 5, 6, 7]
    log.end("a")
    assert log.read("a", 7).ended and log.read("a", 7).steps == []
    monkeypatch.setattr(steps, "JOB_BYTES", 100)
    log.add(line("b", 0, b"x" * 60))
    log.add(line("b", 1, b"y" * 60))
    assert log.read("b", -1).gap and log.read("b", 0).steps[0].data == b"y" * 60


def test_a_repeated_step_breaks_the_log_and_ended_logs_are_few() -> None:
    log = StepLog(lambda _: None)
    log.add(line("a", 0))
    log.add(line("a", 1))
    log.add(line("a", 0))  # the job runs again: never a mix of two runs
    assert log.read("a", -1).gap and log.read("a", 1).gap
    for i in range(steps.ENDED_KEPT + 2):
        log.add(line(f"j{i}", 0))
        log.end(f"j{i}")
    assert log.read("j0", 0).gap  # evicted, after this reader had a step: it knows it missed the rest
    assert log.read(f"j{steps.ENDED_KEPT + 1}", -1).ended
    log.discard(f"j{steps.ENDED_KEPT + 1}")
    assert log.read(f"j{steps.ENDED_KEPT + 1}", 0).gap
