"""Generate jobs of a continuous batch pick their tokens in groups (models/decode_groups.py):
each job's next tokens, finished rows and sampling draws equal its own `DecodeRules.choose`
(the rules `model.generate` decodes by alone), and whole batches equal their lone runs."""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import LanguageModel
from nnglass.models.batched_generate import decode_batch, generate_job
from nnglass.models.decode_rules import DecodeRules, decode_rules
from service_fixtures import recording

BASE = {"max_new_tokens": 4, "pad_token_id": 0, "eos_token_id": 5}
OPTIONS = [
    {**BASE, "min_new_tokens": 3},
    {**BASE, "do_sample": True, "top_k": 7, "temperature": 0.8},
    {**BASE, "do_sample": True, "top_p": 0.6, "min_length": 6},
    {**BASE, "do_sample": True, "min_p": 0.05},
]


@pytest.fixture
def lm(tiny: Any) -> LanguageModel:
    return LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name=f"tiny-{tiny.arch}")


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("options", OPTIONS, ids=["greedy-min-new", "top-k", "top-p-min-length", "min-p"])
def test_a_group_picks_what_each_job_picks_alone(lm: LanguageModel, options: dict[str, Any]) -> None:
    widths, rows = [3, 7, 5], [1, 2, 1]
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(6, 50, (r, w), generator=gen) for r, w in zip(rows, widths)]
    rules = [decode_rules(lm.module, i, options) for i in ids]
    unfinished = [torch.ones(r, dtype=torch.long) for r in rows]
    unfinished[1][1] = 0  # a finished row gets the pad token, as alone
    alone_gens, group_gens = [_seeded(s) for s in (1, 2, 3)], [_seeded(s) for s in (1, 2, 3)]
    alone_ids, alone_unf = list(ids), list(unfinished)
    picked_ids, picked_unf = list(ids), list(unfinished)
    for step in range(4):
        logits = torch.randn(sum(rows), 60, generator=gen) * 3
        logits[:, 5] += 4.0 * (step % 2)  # EOS likely every other step: finished rows appear
        parts = logits.split(rows)
        for j in range(3):
            alone_ids[j], alone_unf[j] = rules[j].choose(alone_ids[j], parts[j], alone_unf[j], alone_gens[j])
        groups: dict[Any, list[int]] = {}
        for j in range(3):
            groups.setdefault(rules[j].group(picked_ids[j]), []).append(j)
        if "min_length" not in options:  # prompts of other widths at the same step: one group
            assert len(groups) == 1
        for key, members in groups.items():
            assert key is not None
            rows_of = torch.cat([torch.arange(sum(rows[:j]), sum(rows[:j + 1])) for j in members])
            out = rules[members[0]].choose_many(
                [(picked_ids[j], picked_unf[j], group_gens[j]) for j in members], logits[rows_of])
            for j, (i, u) in zip(members, out):
                picked_ids[j], picked_unf[j] = i, u
        for j in range(3):
            assert torch.equal(picked_ids[j], alone_ids[j]) and torch.equal(picked_unf[j], alone_unf[j])


def test_only_rules_that_act_alike_share_a_key(lm: LanguageModel) -> None:
    ids = torch.ones(1, 4, dtype=torch.long)
    base = {"max_new_tokens": 3, "min_new_tokens": 2, "pad_token_id": 0}
    key = decode_rules(lm.module, ids, base).group
    assert key(ids) is not None
    assert key(ids) != key(torch.ones(1, 6, dtype=torch.long))  # past its minimum: EOS allowed now
    sampled = decode_rules(lm.module, ids, {**base, "temperature": 0.5, "do_sample": True})
    assert sampled.group(ids) != key(ids)
    # Processors that read the ids (or the text) are not in the whitelist: that job picks alone.
    assert decode_rules(lm.module, ids, {**base, "repetition_penalty": 1.3}).group(ids) is None
    assert decode_rules(lm.module, ids, {**base, "no_repeat_ngram_size": 2}).group(ids) is None


def test_a_batch_of_alike_jobs_picks_once_a_step_and_equals_their_lone_runs(
        lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = lm.transformer.h[0] if "gpt2" in lm.name else lm.model.layers[0]

    def graph(prompt: str, i: int, **options: Any) -> Any:
        with recording(lm.generate(prompt, max_new_tokens=5, min_new_tokens=5, **options)) as t:
            with t.all():
                layer.output[:] += 0.1 * i
                lm.output.logits.save()
            t.result.save()
        return t.graph

    prompts = ["a", "a longer prompt", "mid size", "b", "the widest prompt of all"]
    graphs = [graph(p, i) for i, p in enumerate(prompts)]
    graphs += [graph(p, i, do_sample=True, top_k=9, seed=i) for i, p in enumerate(prompts[:3])]
    graphs.append(graph("penalised", 9, repetition_penalty=1.5))  # picks alone
    calls, shared = batched_counting_picks(lm, graphs, monkeypatch)
    assert sorted(set(calls)) == [3, 5] and len(calls) == 2 * 5  # greedy and sampled: 5 steps each
    same_as_alone(lm, graphs, shared)


def test_groups_whose_rows_interleave_and_eos_masks_equal_their_lone_runs(
        lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy and sampled jobs in turn (each group's rows are not one run of the batch's), with
    minimums of new tokens that end inside the generation and an EOS that is likely: each job's tokens
    and logits are its lone run's, and each group still picks in one call a step."""
    eos = int(lm.module(torch.tensor([[7, 8, 9]])).logits[0, -1].argmax())  # greedy's likely next
    layer = lm.transformer.h[0] if "gpt2" in lm.name else lm.model.layers[0]

    def graph(prompt: str, i: int, **options: Any) -> Any:
        with recording(lm.generate(prompt, max_new_tokens=5, eos_token_id=eos, **options)) as t:
            with t.all():
                layer.output[:] += 0.05 * i
                lm.output.logits.save()
            t.result.save()
        return t.graph

    prompts = ["a", "a longer prompt", "mid size", "b", "the widest prompt of all", "cd"]
    graphs = [graph(p, i, min_new_tokens=3) if i % 2 == 0 else
              graph(p, i, do_sample=True, top_k=9, seed=i, min_new_tokens=2)
              for i, p in enumerate(prompts)]
    calls, shared = batched_counting_picks(lm, graphs, monkeypatch)
    assert calls and max(calls) == 3  # the greedy three and the sampled three, each in one call
    same_as_alone(lm, graphs, shared)


def batched_counting_picks(lm: LanguageModel, graphs: list[Any],
                           monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], dict[int, Any]]:
    """The graphs run in one continuous batch: the size of each group pick call, and each
    job's saves."""
    calls: list[int] = []
    choose_many = DecodeRules.choose_many

    def counted(self: DecodeRules, members: Any, logits: torch.Tensor) -> Any:
        calls.append(len(members))
        return choose_many(self, members, logits)

    monkeypatch.setattr(DecodeRules, "choose_many", counted)
    batch = decode_batch(lm)
    for i, g in enumerate(graphs):
        batch.add(generate_job(lm, g, i))
    shared: dict[int, Any] = {}
    while len(batch):
        for f in batch.step():
            assert f.error is None, f.error
            shared[f.key] = f.saved
    return calls, shared


def same_as_alone(lm: LanguageModel, graphs: list[Any], shared: dict[int, Any]) -> None:
    """Each job's saves equal its lone run's: tokens exactly, logits allclose 1e-4."""
    for i, g in enumerate(graphs):
        alone = lm.run_graph(g)
        for k, v in alone.items():
            pairs = zip(v, shared[i][k]) if isinstance(v, list) else [(v, shared[i][k])]
            for a, b in pairs:
                a, b = lmf.unwrap(getattr(a, "logits", a)), lmf.unwrap(getattr(b, "logits", b))
                if a.is_floating_point():
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
                else:
                    assert torch.equal(a, b)
