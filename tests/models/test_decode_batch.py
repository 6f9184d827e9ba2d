"""Generate jobs in one continuous batch (runtime/decode_batch.py): each job's tokens,
`tracer.result` and per-step saves equal the same graph run alone (`lm.run_graph`, the
lone `model.generate` path), on GPT-2 (learned positions) and Llama (rotary), whatever
the other jobs do: mixed prompt widths, other lengths, sampling, steering, joining late,
ending at EOS, failing, being cancelled, or trying to reach outside their rows."""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import LanguageModel
from nnglass.errors import ExecutionError
from nnglass.graph.ir import Graph
from nnglass.models.batched_generate import decode_batch, generate_job, generation_key
from service_fixtures import recording


@pytest.fixture
def lm(tiny: Any) -> LanguageModel:
    return LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name=f"tiny-{tiny.arch}")


def layer(lm: LanguageModel, i: int) -> Any:
    return lm.transformer.h[i] if "gpt2" in lm.name else lm.model.layers[i]


def record(lm: LanguageModel, prompt: Any, n: int, body: Any, **kwargs: Any) -> Graph:
    with recording(lm.generate(prompt, max_new_tokens=n, **kwargs)) as tracer:
        body(tracer)
    return tracer.graph


def run_batch(lm: LanguageModel, graphs: list[Graph], joins: dict[int, list[Graph]] | None = None,
              drop: dict[int, int] | None = None, prefill_tokens: int | None = None,
              ) -> tuple[dict[int, Any], list[tuple[str, int, int]]]:
    """Run `graphs` in one batch; `joins[s]`: graphs added after step s; `drop[s]`: the job
    cancelled after step s. Each job's Finished by its index, and the passes (kind, rows, jobs)."""
    passes: list[tuple[str, int, int]] = []
    batch = decode_batch(lm, observe=lambda kind, rows, jobs, s: passes.append((kind, rows, jobs)),
                         prefill_tokens=prefill_tokens)
    order = list(graphs)
    for i, g in enumerate(graphs):
        batch.add(generate_job(lm, g, i))
    out: dict[int, Any] = {}
    step = 0
    while len(batch):
        for f in batch.step():
            out[f.key] = f
        step += 1
        for g in (joins or {}).get(step, []):
            batch.add(generate_job(lm, g, len(order)))
            order.append(g)
        if drop and step in drop:
            assert batch.drop(drop[step])
    return out, passes


def same(alone: dict[int, Any], shared: dict[int, Any]) -> None:
    assert alone.keys() == shared.keys()
    for k, a in alone.items():
        b = shared[k]
        a, b = (a, b) if isinstance(a, list) else ([a], [b])
        assert len(a) == len(b), f"node {k}: {len(a)} steps alone, {len(b)} shared"
        for x, y in zip(a, b):
            x, y = lmf.unwrap(getattr(x, "logits", x)), lmf.unwrap(getattr(y, "logits", y))
            if isinstance(x, torch.Tensor) and not x.is_floating_point():
                assert torch.equal(x, y)
            elif isinstance(x, torch.Tensor):
                assert x.shape == y.shape
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
            else:
                assert x == y


def steered(lm: LanguageModel, at: int, scale: float) -> Any:
    """Steer one layer at every step; save its output and the logits at every step, a
    late step's hidden state, and the result."""
    direction = torch.linspace(-1, 1, lm.config.hidden_size if hasattr(lm.config, "hidden_size")
                               else lm.config.n_embd)

    def body(t: Any) -> None:
        with t.all():
            layer(lm, at).output[:] += scale * direction
            lm.output.logits.save()
            layer(lm, 1).output[:, -1].save()
        with t.step(2):
            layer(lm, 0).output.save()
        t.result.save()

    return body


def test_mixed_jobs_in_one_batch_equal_their_lone_runs(lm: LanguageModel) -> None:
    graphs = [
        record(lm, "hi", 6, steered(lm, 0, 0.5), min_new_tokens=6),
        record(lm, ["a much longer prompt here", "x y"], 3, steered(lm, 1, -0.3), min_new_tokens=3),
        record(lm, "sampled, seeded", 7, steered(lm, 0, 0.2), do_sample=True, seed=7, top_k=20,
               min_new_tokens=7),
        record(lm, "temperature", 5, steered(lm, 1, 0.1), do_sample=True, seed=11, temperature=0.7,
               min_new_tokens=5),
    ]  # min_new_tokens: a random model's EOS would end them at unknown steps
    late = [record(lm, "joins later on", 4, steered(lm, 0, 0.4), min_new_tokens=4),
            record(lm, "z", 5, steered(lm, 1, 0.3), do_sample=True, seed=5, top_p=0.9, min_new_tokens=5)]
    alone = [lm.run_graph(g) for g in graphs + late]
    shared, passes = run_batch(lm, graphs, joins={1: late})
    for i, a in enumerate(alone):
        assert shared[i].error is None, shared[i].error
        same(a, shared[i].saved)
    assert max(jobs for kind, _, jobs in passes if kind == "decode") == 6  # all shared a step
    assert [p for p in passes if p[0] == "prefill"] == [("prefill", 5, 4), ("prefill", 2, 2)]
    plain = lm.run_graph(record(lm, "hi", 6, lambda t: t.result.save()))
    result = next(i for i, n in enumerate(graphs[0].nodes) if n.save and n.site and n.site.kind == "result")
    assert not torch.equal(lmf.unwrap(plain[max(plain)]), lmf.unwrap(alone[0][result])), "no steer"


def test_joiners_over_the_prefill_budget_join_at_the_next_steps(lm: LanguageModel) -> None:
    """While rows run, at most `prefill_tokens` padded prompt tokens join in one step (the
    first joiner always); the others join, in order, at the next steps, before the decode
    while more rows wait than run. With no row running, no step waits: all join at once.
    Every job's numbers are still its lone run's."""
    graphs = [record(lm, p, n, steered(lm, i % 2, 0.2 * (i + 1)), min_new_tokens=n)
              for i, (p, n) in enumerate([("abcd", 4), (["wxyz", "qrst"], 3), ("efgh", 5), ("ijkl", 2),
                                          ("a much longer prompt", 3)])]
    width = lm.tokenizer("abcd", return_tensors="pt")["input_ids"].shape[1]
    shared, passes = run_batch(lm, graphs, prefill_tokens=3 * width)  # nothing runs yet
    for i, g in enumerate(graphs):
        assert shared[i].error is None, shared[i].error
        same(lm.run_graph(g), shared[i].saved)
    assert [p for p in passes if p[0] == "prefill"] == [("prefill", 6, 5)]
    running = record(lm, "mnop", 8, steered(lm, 0, 0.1), min_new_tokens=8)
    shared, passes = run_batch(lm, [running], joins={1: graphs}, prefill_tokens=3 * width)
    for i, g in enumerate([running, *graphs]):
        assert shared[i].error is None, shared[i].error
        same(lm.run_graph(g), shared[i].saved)
    # rows x widest prompt within 3 widths: 1 + 2 rows, then 1 + 1 (a third would be 3 x 4),
    # then the long prompt alone (over the budget by itself: the first joiner always joins)
    prefills = [p for p in passes if p[0] == "prefill"]
    assert prefills == [("prefill", 1, 1), ("prefill", 3, 2), ("prefill", 2, 2), ("prefill", 1, 1)]
    # One running row, four joiners of one width each: while more rows wait than run, a
    # step is only the next joiner's prompt (the running row waits; all end together).
    first = record(lm, "abcd", 6, steered(lm, 0, 0.3), min_new_tokens=6)
    late = [record(lm, p, 6, steered(lm, 1, 0.1), min_new_tokens=6) for p in ("efgh", "ijkl", "mnop", "qrst")]
    shared, passes = run_batch(lm, [first], joins={1: late}, prefill_tokens=width)
    for i, g in enumerate([first, *late]):
        same(lm.run_graph(g), shared[i].saved)
    assert [(kind, rows) for kind, rows, _ in passes[:9]] == [
        ("prefill", 1), ("decode", 1), ("prefill", 1), ("prefill", 1), ("decode", 3), ("prefill", 1),
        ("decode", 4), ("prefill", 1), ("decode", 5)]


def test_eos_cancel_and_failure_leave_only_that_job(lm: LanguageModel) -> None:
    def save_result(t: Any) -> None:
        layer(lm, 0).output.save()
        t.result.save()

    first = lm.run_graph(record(lm, "eos", 1, save_result))
    eos = int(lmf.unwrap(first[max(first)])[0, -1])

    def fails_at_step_2(t: Any) -> None:
        with t.step(2):
            layer(lm, 0).output[:, 50].save()  # out of range: its own width is 5 + 2
        t.result.save()

    graphs = [
        record(lm, "eos", 8, save_result, eos_token_id=eos),  # ends at its first token
        record(lm, "fails", 6, fails_at_step_2),
        record(lm, "cancelled", 6, save_result),
        record(lm, "the survivor", 6, steered(lm, 0, 0.5)),
    ]
    shared, _ = run_batch(lm, graphs, drop={3: 2})
    assert shared[0].error is None and int(lmf.unwrap(shared[0].saved[max(shared[0].saved)]).shape[1]) == 4
    same(lm.run_graph(graphs[0]), shared[0].saved)
    assert isinstance(shared[1].error, ExecutionError) and "test_decode_batch.py" in shared[1].error.where
    with pytest.raises(ExecutionError):
        lm.run_graph(graphs[1])  # fails alone too
    assert 2 not in shared  # cancelled: no answer at all
    same(lm.run_graph(graphs[3]), shared[3].saved)


def test_a_job_sees_only_its_own_rows_and_width(lm: LanguageModel) -> None:
    """Negative indices, whole-batch reductions, `lm.output` and shapes mean what they mean
    alone; a whole-batch write touches only the writer's rows."""

    def prying(t: Any) -> None:
        with t.all():
            logits = lm.output.logits
            logits[:, -1].sum(0).save()  # a reduction over the batch axis
            logits[-1].save()  # the last row
            (logits[:, -1] * 0 + 1).sum().save()  # counts its rows
            layer(lm, 0).output[:] = 0.0  # a whole-batch write
            layer(lm, 1).output[:, -1].mean().save()
        t.result.save()

    with recording(lm.generate(max_new_tokens=3)) as tracer:  # two invokes: each its own rows
        with tracer.invoke("ab"):
            tracer.result.save()
            lm.output.logits[:, -1].save()
        with tracer.invoke(["a longer one", "c"]):
            tracer.result.save()
            layer(lm, 1).output[-1].save()
    graphs = [record(lm, ["short", "a longer one"], 4, prying), tracer.graph,
              record(lm, "a neighbour with a long prompt", 5, steered(lm, 1, 0.2))]
    shared, _ = run_batch(lm, graphs)
    for i, g in enumerate(graphs):
        same(lm.run_graph(g), shared[i].saved)


def test_which_graphs_share_a_generation_batch(lm: LanguageModel) -> None:
    assert generation_key(record(lm, "a", 2, lambda t: t.result.save())) is not None
    with recording(lm.trace("a")) as tracer:
        lm.output.save()
    assert generation_key(tracer.graph) is None
    grads = record(lm, "a", 2, lambda t: layer(lm, 0).output.sum().backward())
    assert generation_key(grads) is None


def test_a_member_may_not_set_shared_tables_nor_call_modules_with_the_cache(lm: LanguageModel) -> None:
    """What no window can express is refused outright in a shared batch: setting a value
    whose first axis is not the batch (every row's), and handing a module the KV cache."""
    from transformers.cache_utils import DynamicCache

    from nnglass.runtime.decode_batch import _interpreter

    job = generate_job(lm, record(lm, "a", 2, lambda t: layer(lm, 0).output.save()), 0)
    member = _interpreter(job, lm.module)
    member.batch_size, member.current = 4, 0
    with pytest.raises(ExecutionError, match="shared by every row"):
        member._replace(torch.zeros(1, 3), torch.ones(1, 3), 0)
    assert member._replace(torch.zeros(4, 3), torch.ones(1, 3), 0).sum() == 3  # its own row only
    with pytest.raises(ExecutionError, match="KV cache"):
        member.call_module("lm_head", (torch.zeros(1, 1, 1),), {"cache": DynamicCache()})


def test_a_stop_string_ends_the_generation_there_alone_and_in_the_batch(lm: LanguageModel) -> None:
    """`stop_strings` stops a job at the token where an OpenAI answer's text ends (the first
    stop string, split across tokens: one character each here), not only cuts its text."""
    from nnglass.server.openai_text import Text

    def save_result(t: Any) -> None:
        t.result.save()

    whole = lmf.unwrap(lm.run_graph(record(lm, "stop", 12, save_result, min_new_tokens=12)).popitem()[1])
    tokens = whole[0, 4:].tolist()
    said = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(said) >= 6, "the random model should say something"
    stop = said[3:5]
    text, k = Text(lm.tokenizer, set(), (stop,)), 0
    while not text.over:
        text.push(tokens[k])
        k += 1
    assert k < 12
    graph = record(lm, "stop", 12, save_result, min_new_tokens=12, stop_strings=[stop])
    beside = record(lm, "beside it", 8, save_result, min_new_tokens=8)
    alone = lmf.unwrap(lm.run_graph(graph).popitem()[1])
    assert torch.equal(alone, whole[:, : 4 + k])  # the tokens up to the stop, and no step more
    shared, _ = run_batch(lm, [graph, beside])
    assert torch.equal(lmf.unwrap(shared[0].saved.popitem()[1]), alone)
    same(lm.run_graph(beside), shared[1].saved)
    with pytest.raises(Exception, match="stop_strings"):
        record(lm, "x", 2, save_result, stop_strings=["a" * 300])
