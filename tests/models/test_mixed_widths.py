"""Co-tenants of different prompt widths share one left-padded forward pass, and each sees
its own rows and its own width: every saved value (and every edit) equals the lone run of
the same graph, on GPT-2 (learned positions) and Llama (rotary positions)."""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.graph.merge import merge, share_key, split
from service_fixtures import recording


def record(lm: LanguageModel, body: Any) -> Graph:
    """The graph of `with lm.trace() as t: body(t)`, recorded without running it."""
    with recording(lm.trace()) as tracer:
        body(tracer)
    return tracer.graph


@pytest.fixture
def lm(tiny: Any) -> LanguageModel:
    return LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name=f"tiny-{tiny.arch}")


def layer(lm: LanguageModel, i: int) -> Any:
    return lm.transformer.h[i] if "gpt2" in lm.name else lm.model.layers[i]


def same(a: Any, b: Any) -> None:
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


def users(lm: LanguageModel) -> list[Graph]:
    """Five users, prompts of 2 to 17 tokens, indexing from the left, from the right and
    whole sequences, reading and writing."""

    def left(t: Any) -> None:  # positions from the left: the first real token
        with t.invoke("hello there"):
            layer(lm, 0).output[:, 3] = 0.5
            layer(lm, 0).output[:, 0].save()
            lm.output.logits.save()

    def right(t: Any) -> None:  # from the right, and the shape as alone
        with t.invoke("a much longer prompt!"):
            h = layer(lm, 1).output
            h[:, -2:] = h[:, -2:] * 2
            lm.output.logits[:, -1].save()
            torch.ones_like(h).sum(1).save()  # the width it has alone, counted in the run

    def whole(t: Any) -> None:  # whole sequences, two invokes of their own widths
        with t.invoke("hi"):
            layer(lm, 0).output.save()
        with t.invoke(["ciao amigo", "yo"]):
            layer(lm, 1).output[:] = layer(lm, 1).output + 1
            lm.output.logits.softmax(-1).save()
        with t.invoke():  # this user's whole batch: its rows, its width
            lm.output.logits.sum(1).save()
            torch.ones_like(lm.output.logits[..., 0]).sum(-1).save()

    def short(t: Any) -> None:  # two tokens: the batch pads it the most
        with t.invoke("ok"):
            lm.output.logits.cumsum(1).save()

    def same_width(t: Any) -> None:  # as wide as the batch: nothing hidden
        with t.invoke("a much longer prompt?"):
            layer(lm, 0).output[:, 5:9].save()
            lm.output.logits.save()

    return [record(lm, f) for f in (left, right, whole, short, same_width)]


def test_mixed_widths_share_one_key(lm: LanguageModel) -> None:
    graphs = users(lm)
    assert len({share_key(g) for g in graphs}) == 1 and share_key(graphs[0]) is not None


def test_each_user_sees_its_own_width_and_gets_what_it_gets_alone(lm: LanguageModel) -> None:
    graphs = users(lm)
    alone = [lm.run_graph(g) for g in graphs]
    merged, offsets = merge(graphs)
    together = split(lm.run_graph(merged), graphs, offsets)
    for mine, shared in zip(alone, together):
        assert mine.keys() == shared.keys()
        for node_id in mine:
            same(mine[node_id], shared[node_id])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_batch_width_is_none_of_the_models_sizes(arch: str) -> None:
    """A prompt as long as the number of heads: a width the model has on its own (an
    attention pattern's head axis) is skipped, so only position axes are cut (both of a
    pattern's)."""
    hf = lmf.tiny_llama() if arch == "llama" else lmf.tiny_gpt2()
    hf.set_attn_implementation("eager")  # attention modules return their patterns
    lm = LanguageModel(hf, tokenizer=lmf.char_tokenizer(), name=f"tiny-{arch}")
    heads = hf.config.num_attention_heads

    def patterns(prompt: str) -> Any:
        def body(t: Any) -> None:
            with t.invoke(prompt):
                attn = lm.model.layers[0].self_attn if arch == "llama" else lm.transformer.h[0].attn
                attn.output[0].save()
                attn.output[1].save()  # [batch, heads, positions, positions]
                lm.output.logits.save()
        return body

    graphs = [record(lm, patterns("x" * n)) for n in (heads, heads - 1, 1)]
    alone = [lm.run_graph(g) for g in graphs]
    merged, offsets = merge(graphs)
    for mine, shared in zip(alone, split(lm.run_graph(merged), graphs, offsets)):
        for node_id in mine:
            same(mine[node_id], shared[node_id])


def test_a_co_tenant_cannot_reach_outside_its_window(lm: LanguageModel) -> None:
    """An attacker (short prompt) next to a victim (long prompt) tries every way out:
    negative rows and positions, slices past its ends, reductions over the batch axis,
    whole-batch reads and writes, in-place edits, `lm.output`, flattening. It sees exactly
    what it sees alone, and the victim's numbers are its lone numbers."""

    def attacker(t: Any) -> None:
        with t.invoke("hey"):
            h = layer(lm, 0).output
            h[-1, -1000:] = 1e4  # negative row, a slice past the left end: its own values only
            h.fill_(7.0)  # in place, on the model's memory: its window only
            layer(lm, 1).output[:] = -1e4  # the whole batch, as it sees it
            lm.output.logits.sum(0).save()  # a reduction over the batch axis
            lm.output.logits[:, :1000].save()  # every position it can name
            lm.output.logits[-1, 0].save()  # the first position: its first token, not padding
            layer(lm, 1).input.reshape(-1).save()  # flattened: its numbers only
            torch.ones_like(lm.output.logits).sum().save()  # how much it can see at all

    def victim(t: Any) -> None:
        with t.invoke("a private and rather long prompt"):
            layer(lm, 0).output.save()
            layer(lm, 1).output.save()
            lm.output.logits.save()

    graphs = [record(lm, victim), record(lm, attacker), record(lm, victim)]
    alone = [lm.run_graph(g) for g in graphs]
    merged, offsets = merge(graphs)
    assert all(n.invoke is not None for n in merged.nodes)  # every node addresses a window
    for mine, shared in zip(alone, split(lm.run_graph(merged), graphs, offsets)):
        assert mine.keys() == shared.keys()
        for node_id in mine:
            same(mine[node_id], shared[node_id])


def test_a_tensor_forward_option_is_never_shared(lm: LanguageModel) -> None:
    """A tensor among the forward options (`labels=`, as a graph may carry it) is one user's
    data: such a graph never merges, whatever its keys are called."""
    graph = users(lm)[3]
    ids = graph.invokes[0].kwargs["input_ids"]
    assert share_key(graph) is not None
    graph.options["forward"] = {"labels": ids}
    assert share_key(graph) is None
