"""Co-tenant isolation as a property: two users' trace jobs merged into one forward pass
(`graph.merge`, what the server's shared pass runs) give each user what it gets alone.

Hypothesis generates each user's job: one or two prompts, the longest of one width for
both users (the server shares a pass only between jobs of one padded width, `share_key`;
a shorter prompt is left-padded within its job), and per prompt a few interventions at random layers: a
save, a setter (`output[:, -1] = c`), an in-place edit (`output[:, -1] *= c`), an edit of
the MLP's input; and sometimes a whole-batch invoke (`with t.invoke():`) that edits and
saves every row of that user's batch, and never the other user's. Generation's half of
the property waits for co-batched generation (issue 16, item 5).

CI size: 40 pairs (each: three forward passes of the tiny model).
"""

from __future__ import annotations

from typing import Any

import torch
from graph_strategies import cases
from hypothesis import given
from hypothesis import strategies as st

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.graph.merge import merge, share_key, split
from service_fixtures import recording

EDITS = ("save", "set", "inplace", "mlp_input", "logits")
prompts = st.text(alphabet="abcdefghij klm!?", min_size=1, max_size=12)
edit = st.tuples(st.sampled_from(EDITS), st.integers(0, 1), st.floats(-3, 3, allow_nan=False))
invoke = st.tuples(prompts, st.lists(edit, min_size=1, max_size=3))
job = st.tuples(st.lists(invoke, min_size=1, max_size=2), st.one_of(st.none(), edit))


def _apply(lm: LanguageModel, kind: str, layer: int, c: float) -> None:
    block = lm.model.layers[layer]
    if kind == "save":
        block.output.save()
    elif kind == "set":
        block.output[:, -1] = c
    elif kind == "inplace":
        block.output[:, -1] *= c
    elif kind == "mlp_input":
        block.mlp.down_proj.input[:, -1, :4] = c
    else:
        lm.output.logits[:, -1].save()


def record(lm: LanguageModel, spec: Any, width: int) -> Graph:
    invokes, whole = spec
    with recording(lm.trace()) as t:
        for i, (prompt, edits) in enumerate(invokes):
            prompt = prompt[:width].ljust(width, "a") if i == 0 else prompt[:width]
            with t.invoke(prompt):
                for e in edits:
                    _apply(lm, *e)
                lm.output.logits.save()  # every prompt's result shows what the edits did
        if whole is not None:
            with t.invoke():  # this user's whole batch: its rows only
                _apply(lm, *whole)
                lm.model.layers[1].output.sum().save()
    return t.graph


def _close(a: Any, b: Any) -> None:
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    else:
        assert a == b


def test_merged_pairs_equal_each_alone(fuzz_lm: LanguageModel) -> None:
    lm = fuzz_lm

    @cases(40)
    @given(job, job, st.integers(1, 12))
    def prop(a: Any, b: Any, width: int) -> None:
        graphs = [record(lm, a, width), record(lm, b, width)]
        assert share_key(graphs[0]) == share_key(graphs[1]) is not None  # the server would share
        alone = [lm.run_graph(g) for g in graphs]
        merged, offsets = merge(graphs)
        together = split(lm.run_graph(merged), graphs, offsets)
        for mine, shared in zip(alone, together):
            assert mine.keys() == shared.keys()
            for node_id in mine:
                _close(mine[node_id], shared[node_id])

    prop()
