"""The worker's side of a generation session (server/generation.run_session), against a
stand-in parent: without a lane, a job that runs between two steps is answered before the
next step, and the generation still steps between any two such messages; with one
(server/beside.py), such a job runs beside the batch and is answered there, a dropped
generate job is answered CANCELLED, and every job gets exactly one answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nnglass import LanguageModel
from nnglass.server.beside import Lane
from nnglass.server.generation import run_session
from service_fixtures import recording


class Replica:
    """What run_session uses of the worker's LoadedModel: the model, the jobs' graphs,
    merged passes for the others, and the result store."""

    def __init__(self, lm: LanguageModel, graphs: dict[str, Any]) -> None:
        self.lm, self.graphs = lm, graphs
        self.join_tokens = None  # every joiner's prompt in one forward
        self.saved: dict[str, Any] = {}

    def _load(self, request: dict[str, Any]) -> Any:
        return self.graphs[request["job"]]

    @property
    def module(self) -> Any:
        return self.lm.module

    def batch(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        return {"batch": self._shared(requests)}

    def _shared(self, requests: list[dict[str, Any]], send: Any = None) -> list[dict[str, Any]]:
        for r in requests:
            self.saved[r["job"]] = self.lm.run_graph(self.graphs[r["job"]])
        return [{"job": r["job"], "status": "COMPLETED"} for r in requests]

    def _store(self, request: dict[str, Any], graph: Any, saved: dict[int, Any]) -> int:
        self.saved[request["job"]] = saved
        return 0

    def debug_info(self) -> dict[str, Any]:
        return {}


def test_a_job_between_steps_is_answered_before_the_next_step(tiny_dir: Path) -> None:
    lm = LanguageModel(str(tiny_dir), name="tiny")
    with recording(lm.generate("a generation", max_new_tokens=6, min_new_tokens=6)) as gen:
        gen.result.save()
    graphs: dict[str, Any] = {"gen": gen.graph}
    for i in range(3):
        with recording(lm.trace(f"trace {i}")) as trace:
            lm.output.logits.save()
        graphs[f"trace{i}"] = trace.graph
    replica = Replica(lm, graphs)
    messages: list[dict[str, Any]] = []

    def converse(message: dict[str, Any]) -> dict[str, Any]:
        messages.append(message)
        if len(messages) in (1, 2):  # a trace comes at the first step boundary, and another
            return {"more": [{"job": f"trace{len(messages) - 1}"}]}  # as soon as it is answered
        if len(messages) == 3:
            return {"more": [{"job": "trace2"}]}
        return {}

    run_session(replica, [{"job": "gen"}], converse)  # type: ignore[arg-type]
    answered = [[a["job"] for a in m["answers"]] for m in messages]
    forwards = [len(m["steps"]) for m in messages]
    # trace0 is answered at once, in a message without a forward; trace1, admitted by that
    # message's reply, runs too, but the batch steps before its answer goes: no starving.
    assert answered[:4] == [[], ["trace0"], ["trace1"], ["trace2"]]
    assert forwards[:4] == [2, 0, 1, 0]  # the first step: the prompt's forward and one decode
    assert answered[-1] == ["gen"] and messages[-1]["running"] == 0
    assert sum(forwards) == 6  # the generation's forwards, none lost to the traces
    for i in range(3):
        torch.testing.assert_close(replica.saved[f"trace{i}"], lm.run_graph(graphs[f"trace{i}"]))
    alone = lm.run_graph(gen.graph)
    assert all(torch.equal(alone[k], replica.saved["gen"][k]) for k in alone)


def test_with_a_lane_other_jobs_are_answered_beside_the_batch(tiny_dir: Path) -> None:
    lm = LanguageModel(str(tiny_dir), name="tiny")
    graphs: dict[str, Any] = {}
    for name in ("gen", "dropped"):
        with recording(lm.generate(f"a generation {name}", max_new_tokens=6, min_new_tokens=6)) as gen:
            gen.result.save()
        graphs[name] = gen.graph
    with recording(lm.trace("a trace")) as trace:
        lm.output.logits.save()
    graphs["trace"] = trace.graph
    replica = Replica(lm, graphs)
    beside: list[dict[str, Any]] = []
    lane = Lane(replica, beside.append)  # type: ignore[arg-type]
    messages: list[dict[str, Any]] = []

    def converse(message: dict[str, Any]) -> dict[str, Any]:
        messages.append(message)
        return {1: {"more": [{"job": "trace"}]}, 2: {"drop": ["dropped"]}}.get(len(messages), {})

    run_session(replica, [{"job": "gen"}, {"job": "dropped"}], converse, lane=lane)  # type: ignore[arg-type]
    lane.wait(30)
    assert not lane.busy
    in_steps = [(a["job"], a["status"]) for m in messages for a in m["answers"]]
    assert sorted(in_steps) == [("dropped", "CANCELLED"), ("gen", "COMPLETED")]
    assert [[(a["job"], a["status"]) for a in m["answers"]] for m in beside] == [[("trace", "COMPLETED")]]
    assert all(m["beside"] for m in beside)
    assert sum(len(m["steps"]) for m in messages) == 6  # the generation's forwards, none lost
    torch.testing.assert_close(replica.saved["trace"], lm.run_graph(graphs["trace"]))
    alone = lm.run_graph(graphs["gen"])
    assert all(torch.equal(alone[k], replica.saved["gen"][k]) for k in alone)
