"""Fidelity: a tiny random Llama: layer, attention (keyword inputs), rotary and
projection sites equal hooks; logit lens, invokes.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py). Rows of an invoke are compared with running alone
within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch
from fidelity import TOL  # tests/runtime/fidelity.py

# --- Llama -------------------------------------------------------------------------------


def test_llama_layer_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.layers[1], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.model.layers[-1].output.save()
        return h

    assert torch.equal(run(llama, experiment), ref)


def test_llama_attention_input_passed_by_keyword_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    [(args, kwargs)], _ = plain.inputs(llama, llama.model.layers[0].self_attn, ids, use_cache=False)
    assert args == () and "hidden_states" in kwargs  # transformers passes it by keyword

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.model.layers[0].self_attn.input.save()
        return h

    assert torch.equal(run(llama, experiment), kwargs["hidden_states"])


def test_llama_attention_keyword_input_setter_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(a, kw):
        return a, {**kw, "hidden_states": kw["hidden_states"] * 0.5}

    ref = plain.edit_inputs(llama, llama.model.layers[0].self_attn, edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            attn = net.model.layers[0].self_attn
            attn.input = attn.input * 0.5
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(llama, experiment), ref.logits)


def test_llama_attention_tuple_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.layers[0].self_attn, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.model.layers[0].self_attn.output.save()
        return out

    out = run(llama, experiment)
    assert type(out) is tuple and len(out) == len(ref)
    assert torch.equal(out[0], ref[0])


def test_llama_rotary_embedding_tuple_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.rotary_emb, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            cos, sin = net.model.rotary_emb.output[0].save(), net.model.rotary_emb.output[1].save()
        return cos, sin

    cos, sin = run(llama, experiment)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])


def test_llama_down_proj_input_index_setter_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(a, kw):
        a[0][:, -1, [3, 7]] = 10
        return a, kw

    ref = plain.edit_inputs(llama, llama.model.layers[1].mlp.down_proj, edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.model.layers[1].mlp.down_proj.input[:, -1, [3, 7]] = 10
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(llama, experiment), ref.logits)


def test_llama_inplace_slice_setter_on_layer_output(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(out):
        out[:, -1] = 0
        return out

    ref = plain.edit_output(llama, llama.model.layers[0], edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.model.layers[0].output[:, -1] = 0
            after = net.model.layers[0].output[:, -1].save()
            logits = net.output.logits.save()
        return after, logits

    after, logits = run(llama, experiment)
    assert torch.equal(after, torch.zeros(2, 32))
    assert torch.equal(logits, ref.logits)


def test_llama_logit_lens_equals_modules_on_hooked_value(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (hidden,), _ = plain.outputs(llama, llama.model.layers[0], ids, use_cache=False)
    with torch.no_grad():
        ref = llama.lm_head(llama.model.norm(hidden))

    def experiment(net):
        with net.trace(ids, use_cache=False):
            lens = net.lm_head(net.model.norm(net.model.layers[0].output)).save()
        return lens

    assert torch.equal(run(llama, experiment), ref)


def test_llama_buffer_read(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            inv_freq = net.model.rotary_emb.inv_freq.save()
        return inv_freq

    assert torch.equal(run(llama, experiment), llama.model.rotary_emb.inv_freq)


def test_llama_invokes_of_different_sizes_equal_running_alone(run, llama, plain):
    ids1, ids2 = plain.token_ids(1, 6, seed=1), plain.token_ids(3, 6, seed=2)
    (h1_alone,), y1 = plain.outputs(llama, llama.model.layers[0], ids1, use_cache=False)
    (h2_alone,), y2 = plain.outputs(llama, llama.model.layers[0], ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                h1, l1 = net.model.layers[0].output.save(), net.output.logits.save()
            with tracer.invoke(ids2, use_cache=False):
                h2, l2 = net.model.layers[0].output.save(), net.output.logits.save()
        return h1, l1, h2, l2

    h1, l1, h2, l2 = run(llama, experiment)
    assert h1.shape == (1, 6, 32) and h2.shape == (3, 6, 32)
    assert torch.allclose(h1, h1_alone, **TOL) and torch.allclose(h2, h2_alone, **TOL)
    assert torch.allclose(l1, y1.logits, **TOL) and torch.allclose(l2, y2.logits, **TOL)


def test_llama_patching_across_invokes(run, llama, plain):
    clean, corrupt = plain.token_ids(2, 6, seed=1), plain.token_ids(2, 6, seed=2)
    (clean_h,), _ = plain.outputs(llama, llama.model.layers[0], clean, use_cache=False)
    ref = plain.edit_output(llama, llama.model.layers[0], lambda out: clean_h, corrupt, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(clean, use_cache=False):
                h = net.model.layers[0].output
            with tracer.invoke(corrupt, use_cache=False):
                net.model.layers[0].output = h
                logits = net.output.logits.save()
        return logits

    assert torch.allclose(run(llama, experiment), ref.logits, **TOL)
