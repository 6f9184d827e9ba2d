"""Attention-pattern experiments as nnsight 0.8 users write them (no `output_attentions`):
the pattern from the queries and keys a layer computed, a head ablated at the output
projection's input, a head's direct logit attribution. On tiny GPT-2 and tiny Llama here
(SmolLM2: test_porting_smol.py), each against plain PyTorch hooks and after a JSON round trip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lm_fixtures as lmf
import pytest
import torch

PROMPT = "The truth is"


def layer(tiny: Any, x: Any, i: int) -> Any:
    return x.transformer.h[i] if tiny.arch == "gpt2" else x.model.layers[i]


def out_proj(tiny: Any, x: Any, i: int) -> Any:
    """The attention's output projection: its input is the heads' outputs, concatenated."""
    return layer(tiny, x, i).attn.c_proj if tiny.arch == "gpt2" else layer(tiny, x, i).self_attn.o_proj


def heads(tiny: Any) -> tuple[int, int, int]:
    c = tiny.hf.config
    n = c.num_attention_heads
    return n, getattr(c, "num_key_value_heads", None) or n, c.hidden_size // n


def rotate_half(x: Any) -> Any:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def qkv(tiny: Any, lm: Any, i: int) -> tuple[Any, Any, Any]:
    """Queries, keys, values `[B, heads, T, head_dim]` as the layer computed them (inside a
    trace: proxies; nnsight style, shapes from metadata)."""
    n, n_kv, hd = heads(tiny)
    if tiny.arch == "gpt2":
        attn = layer(tiny, lm, i).attn
        q, k, v = attn.c_attn.output.split(tiny.hf.config.hidden_size, dim=2)
        b, t = q.shape[0], q.shape[1]
        return tuple(x.view(b, t, n, hd).transpose(1, 2) for x in (q, k, v))  # type: ignore[return-value]
    attn = layer(tiny, lm, i).self_attn
    q, k, v = attn.q_proj.output, attn.k_proj.output, attn.v_proj.output
    b, t = q.shape[0], q.shape[1]
    q = q.view(b, t, n, hd).transpose(1, 2)
    k = k.view(b, t, n_kv, hd).transpose(1, 2)
    v = v.view(b, t, n_kv, hd).transpose(1, 2)
    cos, sin = attn.inputs[1]["position_embeddings"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return q, k.repeat_interleave(n // n_kv, dim=1), v.repeat_interleave(n // n_kv, dim=1)


def test_attention_pattern_from_queries_and_keys(tiny: Any, pair: Any, both: Any) -> None:
    """The pattern reproduces the layer: pattern @ values through the output projection is
    the attention's own output (plain hook), rows sum to 1, nothing attends ahead."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    _, _, hd = heads(tiny)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            q, k, v = qkv(tiny, lm, 1)
            t = q.shape[-2]
            scores = (q @ k.transpose(-1, -2)) * hd**-0.5
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1).save()
            values = v.save()
        return pattern, values

    pattern, values = both(pair, experiment)
    proj = out_proj(tiny, tiny.hf, 1)
    block = layer(tiny, tiny.hf, 1)
    attn_out, _ = lmf.hook_view(tiny.hf, block.attn if tiny.arch == "gpt2" else block.self_attn, ids, mask)
    b, n, t, _ = pattern.shape
    with torch.no_grad():
        ctx = (pattern @ values).transpose(1, 2).reshape(b, t, n * hd)
        lmf.assert_close(proj(ctx), attn_out[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(pattern.sum(-1), torch.ones(b, n, t))
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))


def test_head_ablation_at_the_output_projection(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    _, _, hd = heads(tiny)
    head = 1

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            proj = out_proj(tiny, lm, 0)
            assert proj.input.shape[-1] % hd == 0
            proj.input[:, :, head * hd : (head + 1) * hd] = 0
            logits = lm.output.logits.save()
        return logits

    def zero_head(x: torch.Tensor) -> torch.Tensor:
        x[:, :, head * hd : (head + 1) * hd] = 0
        return x

    got = both(pair, experiment)
    with lmf.hooks(out_proj(tiny, tiny.hf, 0).register_forward_pre_hook(lmf.input_editor(zero_head))):
        ref = lmf.forward(tiny.hf, ids, mask)
    assert torch.equal(got, ref)


def test_direct_logit_attribution_of_each_head(tiny: Any, pair: Any, both: Any) -> None:
    """Each head's output, through its slice of the output projection and the unembedding,
    at the last position, for the model's top token (real weights meet proxies)."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    n, _, hd = heads(tiny)
    w_o = out_proj(tiny, tiny.hf, 1).weight.detach()
    w_o = w_o if tiny.arch != "gpt2" else w_o.T  # GPT-2's Conv1D stores [in, out]
    w_u = tiny.hf.lm_head.weight.detach()

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            z = out_proj(tiny, lm, 1).input[0, -1]
            top = lm.output.logits[0, -1].argmax()
            per_head = [w_o[:, h * hd : (h + 1) * hd] @ z[h * hd : (h + 1) * hd] for h in range(n)]
            contributions = torch.stack([w_u[top] @ x for x in per_head]).save()
        return contributions

    got = both(pair, experiment)
    seen: list[torch.Tensor] = []
    with lmf.hooks(out_proj(tiny, tiny.hf, 1).register_forward_pre_hook(lambda m, a: seen.append(a[0]))):
        logits = lmf.forward(tiny.hf, ids, mask)
    z, top = seen[0][0, -1], logits[0, -1].argmax()
    per_head = [w_o[:, h * hd : (h + 1) * hd] @ z[h * hd : (h + 1) * hd] for h in range(n)]
    ref = torch.stack([w_u[top] @ x for x in per_head])
    assert ref.shape == (n,)
    lmf.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@contextmanager
def eager_attention(hf: Any) -> Iterator[None]:
    """The model computes its attention probabilities (what nnsight users load with
    `attn_implementation="eager"`); put back as it was."""
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


def test_attention_pattern_and_a_head_knocked_out_through_source(tiny: Any, pair: Any, both: Any) -> None:
    """nnsight 0.8 reads `attn.source.attention_interface_0.output[1]`; nnglass names the
    operation itself: `attn.source.softmax_0` (docs/porting-from-nnsight.md). Layer 0's head
    1 attends nowhere; layer 1's pattern is read in the same pass. The reference: a plain
    softmax monkeypatch doing the same while each attention runs."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    head = 1

    def attn(x: Any, i: int) -> Any:
        return layer(tiny, x, i).attn if tiny.arch == "gpt2" else layer(tiny, x, i).self_attn

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            attn(lm, 0).source.softmax_0.output[:, head] = 0
            pattern = attn(lm, 1).source.softmax_0.output.save()
            assert pattern.shape[1] == heads(tiny)[0] and pattern.shape[-1] == pattern.shape[-2]
            logits = lm.output.logits.save()
        return pattern, logits

    with eager_attention(tiny.hf):
        pattern, logits = both(pair, experiment)
        running: list[int] = []  # which layer's attention is running
        seen: dict[int, torch.Tensor] = {}
        real = torch.nn.functional.softmax

        def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = real(*args, **kwargs)
            if running == [0]:
                out = out.clone()
                out[:, head] = 0
            if running:
                seen.setdefault(running[0], out)
            return out

        handles = []
        for i in (0, 1):
            a = attn(tiny.hf, i)
            handles += [a.register_forward_pre_hook(lambda m, args, i=i: running.append(i)),
                        a.register_forward_hook(lambda m, args, out: running.clear())]
        with pytest.MonkeyPatch.context() as mp, lmf.hooks(*handles):
            mp.setattr(torch.nn.functional, "softmax", softmax)
            ref = lmf.forward(tiny.hf, ids, mask)
    assert torch.equal(pattern, seen[1]) and torch.equal(logits, ref)
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


EXPERIMENTS = [
    test_attention_pattern_from_queries_and_keys,
    test_head_ablation_at_the_output_projection,
    test_direct_logit_attribution_of_each_head,
    test_attention_pattern_and_a_head_knocked_out_through_source,
]
