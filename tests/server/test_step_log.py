"""server/steps.py on its own: the worker's step lines keep within their byte budget, and the
server's log is bounded, read by cursor, and says when a reader has missed something."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


class _Notifications:
    """A stand-in for PostgreSQL's NOTIFY, in process: every listener of a channel gets each."""

    def __init__(self) -> None:
        self.handlers: list[tuple[str, Any]] = []

    def on(self, channel: str, handler: Any) -> None:
        self.handlers.append((channel, handler))

    @contextmanager
    def tx(self) -> Iterator[Any]:
        yield self

    def execute(self, sql: str, params: tuple[list[str], list[str]]) -> None:
        for channel, payload in zip(*params, strict=True):
            for listens, handler in self.handlers:
                if listens == channel:
                    handler(payload)


def _until(done: Any) -> None:
    deadline = time.monotonic() + 30  # a bound on the wait (a sender thread), not a measurement
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_steps_cross_to_a_frontend_that_wants_them_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two frontends' relays on one (stand-in) database: B's reader gets A's steps, those A
    logged before it asked first; a step too big for a notification comes without its
    values; a repeat is not taken twice; nothing crosses for a job nobody elsewhere wants."""
    from nnglass.server import step_relay

    notes = _Notifications()
    relays, logs = [], []
    for _ in range(2):
        relay = step_relay.PgStepRelay(notes, notes)  # type: ignore[arg-type]
        log = StepLog(lambda job: None)
        relay.attach(log)
        relays.append(relay)
        logs.append(log)
    (a, b), (a_log, b_log) = relays, logs

    def made_by_a(k: int, values: bytes | None = None, job: str = "j") -> None:
        line = {"job": job, "step": k, "tokens": [[k]],
                **({"values": base64.b64encode(values).decode()} if values else {})}
        a_log.add(line)
        a.export(line)

    made_by_a(0, encode_results({1: [torch.ones(2)]}))
    made_by_a(1)
    made_by_a(0, job="nobody-wants-it")
    with b.want("j"):
        _until(lambda: len(b_log.read("j", -1).steps) == 2)
        a.export({"job": "j", "step": 1, "tokens": [[1]]})  # a repeat (a backfill's race): not taken again
        made_by_a(2, b"x" * step_relay.MAX_PAYLOAD)  # too big to notify with its values (sent in order)
        _until(lambda: len(b_log.read("j", -1).steps) == 3)
        got = b_log.read("j", -1)
        assert not got.gap and [s.step for s in got.steps] == [0, 1, 2]
        assert torch.equal(got.steps[0].values()[1][0], torch.ones(2))
        assert got.steps[2].dropped and got.steps[2].data is None
        assert a_log.read("j", -1).steps[2].data is not None  # (A keeps what it made)
    assert b_log.read("j", -1).steps == [] and b_log.read("nobody-wants-it", -1).steps == []
    for relay in relays:
        relay.close()
