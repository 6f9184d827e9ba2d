"""Fuzzing fixtures: real graphs recorded with the library (the seeds of the mutations).
How many cases each property runs: `graph_strategies.cases`.

The long run caps this process's address space (and so its servers' and workers', which
inherit it): a runaway allocation is a MemoryError that hypothesis reports with its
case, not the kernel's out-of-memory killer taking the run and its report with it."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
from graph_strategies import PROFILE, Recorded

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import Graph
from service_fixtures import recording
from service_fixtures import start_server as start_server  # the fixtures, by name
from service_fixtures import tiny_config as tiny_config
from service_fixtures import tiny_dir as tiny_dir

LONG_RUN_ADDRESS_SPACE = 8 * 2**30  # each process; the fuzzed ones use under 1 GiB


def pytest_configure(config: pytest.Config) -> None:
    if PROFILE == "long":
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = LONG_RUN_ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(hard, LONG_RUN_ADDRESS_SPACE)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


@pytest.fixture(scope="session")
def fuzz_lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name="tiny")


@pytest.fixture(scope="session")
def recorded(fuzz_lm: LanguageModel) -> Recorded:
    """Real graphs recorded with the library (trace, edit in place, whole-batch edit,
    attached tensor, generation, session), as (JSON data, safetensors bytes)."""
    lm = fuzz_lm
    graphs: list[Graph] = []
    with recording(lm.trace("hi")) as t:
        lm.model.layers[0].output.save()
    graphs.append(t.graph)
    with recording(lm.trace(["hello", "hi"])) as t:
        lm.model.layers[0].output[:, -1] = 0
        lm.model.layers[1].mlp.output[0] *= 2
        lm.output.logits.softmax(-1)[:, -1].topk(3)[1].save()
    graphs.append(t.graph)
    with recording(lm.trace("abc")) as t:
        h = lm.model.layers[1].output
        lm.model.layers[1].output = h + torch.ones(32)
        lm.lm_head(lm.model.norm.output).argmax(-1).save()
    graphs.append(t.graph)
    with recording(lm.generate("ab", max_new_tokens=3)) as t:
        lm.lm_head.output[:, -1].argmax(-1).save()
        t.result.save()
    graphs.append(t.graph)
    session = lm.session()
    with recording(session):
        with lm.trace("Paris"):
            h = lm.model.layers[0].output[:, -1]
        with lm.trace("Rome"):
            lm.model.layers[0].output[:, -1] = h
            lm.output.logits[:, -1].save()
    graphs.append(Graph(model="tiny", mode="session", children=[t.graph for t in session.tracers]))
    out = []
    for g in graphs:
        graph_json, tensors = wire.encode(g)
        out.append((json.loads(graph_json), tensors))
    assert any(t is not None for _, t in out)
    return out
