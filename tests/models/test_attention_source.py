"""`.source`: operations inside a module's forward, on tiny GPT-2 and tiny Llama under eager
attention. Reading the attention probabilities equals transformers' own
`output_attentions=True`; editing them equals the same edit made by a plain PyTorch
monkeypatch of `torch.nn.functional.softmax`; every run also goes through the JSON codec
(`both`: bitwise equal); a name the forward does not make fails at the user's line.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass.errors import TraceError

PROMPTS = ["The truth is", "Hi"]  # two widths: the second is left-padded


def attention(tiny: Any, x: Any, i: int) -> Any:
    layer = x.transformer.h[i] if tiny.arch == "gpt2" else x.model.layers[i]
    return layer.attn if tiny.arch == "gpt2" else layer.self_attn


@pytest.fixture
def eager(tiny: Any) -> Iterator[Any]:
    """The tiny model with eager attention (the user's choice: `attn_implementation="eager"`
    when loading, or `set_attn_implementation`), so the probabilities exist at all."""
    tiny.hf.set_attn_implementation("eager")
    yield tiny


def test_probabilities_equal_output_attentions(eager: Any, pair: Any, both: Any) -> None:
    n = eager.hf.config.num_hidden_layers

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPTS):
            probs = [attention(eager, lm, i).source.softmax_0.output.save() for i in range(n)]
            shape = probs[0].shape  # record-time metadata of an operation's value
            assert isinstance(probs[0], torch.Tensor) and shape[-1] == shape[-2]
        return probs

    got = both(pair, experiment)
    ids, mask = lmf.padded(eager.tokenizer, PROMPTS)
    hf = copy.deepcopy(eager.hf)  # transformers leaves its attention-recording hooks installed
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=lmf.positions(mask), use_cache=False,
                 output_attentions=True).attentions
    assert len(got) == len(ref) == n
    for p, r in zip(got, ref):
        assert torch.equal(p, r)


def test_zeroing_a_heads_pattern_equals_a_monkeypatched_softmax(eager: Any, pair: Any, both: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    head = 1

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPTS):
            attention(eager, lm, 0).source.softmax_0.output[:, head] = 0
            logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)

    inside: list[bool] = []  # plain PyTorch: a softmax call while layer 0's attention runs
    attn0 = attention(eager, eager.hf, 0)
    real = torch.nn.functional.softmax

    def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        if inside:
            out = out.clone()
            out[:, head] = 0
        return out

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)
    with lmf.hooks(attn0.register_forward_pre_hook(lambda m, a: inside.append(True)),
                   attn0.register_forward_hook(lambda m, a, o: inside.clear())):
        ids, mask = lmf.padded(eager.tokenizer, PROMPTS)
        ref = lmf.forward(eager.hf, ids, mask)
    monkeypatch.undo()
    assert torch.equal(got, ref)
    assert not torch.equal(got, lmf.forward(eager.hf, ids, mask))  # the edit did something


def test_the_scores_and_the_heads_outputs(eager: Any, pair: Any, both: Any) -> None:
    """matmul_0 is q k^T, whose scaled softmax (with the mask) is softmax_0's output; matmul_1
    is probabilities @ values: the output projection's input, heads concatenated."""

    def experiment(lm: Any) -> Any:
        attn = attention(eager, lm, 1)
        with lm.trace(PROMPTS[0]):
            scores = attn.source.matmul_0.output.save()
            probs = attn.source.softmax_0.output.save()
            heads = attn.source.matmul_1.output.save()
            proj_in = (attn.c_proj if eager.arch == "gpt2" else attn.o_proj).input.save()
        return scores, probs, heads, proj_in

    scores, probs, heads, proj_in = both(pair, experiment)
    d = eager.hf.config.hidden_size // eager.hf.config.num_attention_heads
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    lmf.assert_close((scores * d**-0.5).masked_fill(~causal, float("-inf")).softmax(-1), probs,
                     atol=1e-6, rtol=1e-5)
    b, n, t, _ = heads.shape
    assert torch.equal(heads.transpose(1, 2).reshape(b, t, n * d), proj_in)


def test_a_name_the_forward_does_not_make_fails_at_the_users_line(eager: Any, pair: Any) -> None:
    attn = attention(eager, pair.local, 0)
    listing = repr(attn.source)
    assert "softmax_0" in listing and "matmul_1" in listing
    with pytest.raises(TraceError) as err:
        with pair.local.trace(PROMPTS[0]):
            line = f"{__file__}:{sys._getframe().f_lineno + 1}"
            attn.source.softmax_1.output.save()
    assert err.value.where == line
    assert "makes no call 'softmax_1'" in str(err.value) and "softmax_0" in str(err.value)
    with pytest.raises(TraceError, match="with <op> one of softmax"):
        with pair.local.trace(PROMPTS[0]):
            attn.source.attention_probs.output.save()


def test_sdpa_has_the_fused_call_and_no_probabilities(tiny: Any, pair: Any, both: Any) -> None:
    """Under transformers' default (sdpa) the forward never forms the probabilities: the
    listing says so, and the fused call's output is the heads' outputs."""
    attn = attention(tiny, pair.local, 0)
    assert "scaled_dot_product_attention_0" in repr(attn.source) and "softmax_0" not in repr(attn.source)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPTS[0]):
            a = attention(tiny, lm, 0)
            heads = a.source.scaled_dot_product_attention_0.output.save()
            proj_in = (a.c_proj if tiny.arch == "gpt2" else a.o_proj).input.save()
        return heads, proj_in

    heads, proj_in = both(pair, experiment)
    b, n, t, d = heads.shape
    assert torch.equal(heads.transpose(1, 2).reshape(b, t, n * d), proj_in)


def test_every_generation_step_with_the_kv_cache(eager: Any, pair: Any, both: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Per step: the prompt's square pattern, then one query row over the cached keys; equal
    to what a patched softmax sees inside the same layer during plain `model.generate`."""

    def experiment(lm: Any) -> Any:
        with lm.generate(PROMPTS, max_new_tokens=3) as tracer:
            with tracer.all():
                probs = attention(eager, lm, 1).source.softmax_0.output.save()
            ids = tracer.result.save()
        return probs, ids

    probs, ids = both(pair, experiment)
    seen: list[torch.Tensor] = []
    inside: list[bool] = []
    real = torch.nn.functional.softmax

    def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        if inside:
            seen.append(out)
        return out

    attn1 = attention(eager, eager.hf, 1)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)
    with lmf.hooks(attn1.register_forward_pre_hook(lambda m, a: inside.append(True)),
                   attn1.register_forward_hook(lambda m, a, o: inside.clear())):
        ref_ids = lmf.generate(eager.hf, *lmf.padded(eager.tokenizer, PROMPTS), max_new_tokens=3)
    monkeypatch.undo()
    assert torch.equal(ids, ref_ids) and len(probs) == len(seen) == 3
    width = probs[0].shape[-1]
    assert [tuple(p.shape[-2:]) for p in probs] == [(width, width), (1, width + 1), (1, width + 2)]
    for p, r in zip(probs, seen):
        assert torch.equal(p, r)
