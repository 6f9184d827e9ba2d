"""Fidelity: a tiny random GPT-2: block, attention, MLP and model outputs equal hooks;
steering, logit lens, invokes.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py). Rows of an invoke are compared with running alone
within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch
from fidelity import TOL  # tests/runtime/fidelity.py

# --- GPT-2 -------------------------------------------------------------------------------


def test_gpt2_block_output_is_a_tensor_equal_to_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (ref,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.transformer.h[0].output.save()
            row0 = net.transformer.h[0].output[0].save()
        return h, row0

    h, row0 = run(gpt2, experiment)
    assert isinstance(h, torch.Tensor) and torch.equal(h, ref)
    assert torch.equal(row0, ref[0])


def test_gpt2_attention_tuple_output_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (ref,), _ = plain.outputs(gpt2, gpt2.transformer.h[1].attn, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.transformer.h[-1].attn.output.save()
        return out

    out = run(gpt2, experiment)
    assert type(out) is tuple and len(out) == len(ref)
    assert torch.equal(out[0], ref[0])
    assert out[1] is None and ref[1] is None


def test_gpt2_block_inputs_equal_pre_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    [(ref_args, ref_kwargs)], _ = plain.inputs(gpt2, gpt2.transformer.h[1], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            args, kwargs = net.transformer.h[1].inputs
            saved = (args.save(), kwargs.save())
            first = net.transformer.h[1].input.save()
        return saved, first

    (args, kwargs), first = run(gpt2, experiment)
    assert len(args) == len(ref_args)
    assert torch.equal(args[0], ref_args[0]) and torch.equal(first, ref_args[0])
    assert all(a is None for a in args[1:]) and all(a is None for a in ref_args[1:])
    assert set(kwargs) == set(ref_kwargs)
    for k, v in ref_kwargs.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(kwargs[k], v), k
        else:
            assert kwargs[k] == v, k


def test_gpt2_model_output_keeps_its_class(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    with torch.no_grad():
        ref = gpt2(ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.output.save()
            logits = net.output.logits.save()
        return out, logits

    out, logits = run(gpt2, experiment)
    assert type(out) is type(ref)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(logits, ref.logits)


def test_gpt2_steering_last_token_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    steer = plain.randn(32, seed=9)

    def edit(out):
        out[:, -1] += steer
        return out

    ref = plain.edit_output(gpt2, gpt2.transformer.h[0], edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.transformer.h[0].output[:, -1] += steer
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(gpt2, experiment), ref.logits)


def test_gpt2_mlp_output_setter_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    ref = plain.edit_output(gpt2, gpt2.transformer.h[1].mlp, lambda out: out * 0, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.transformer.h[1].mlp.output = net.transformer.h[1].mlp.output * 0
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(gpt2, experiment), ref.logits)


def test_gpt2_logit_lens_equals_modules_on_hooked_value(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (hidden,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], ids, use_cache=False)
    with torch.no_grad():
        ref = gpt2.lm_head(gpt2.transformer.ln_f(hidden))

    def experiment(net):
        with net.trace(ids, use_cache=False):
            lens = net.lm_head(net.transformer.ln_f(net.transformer.h[0].output)).save()
        return lens

    assert torch.equal(run(gpt2, experiment), ref)


def test_gpt2_embedding_weight_read(run, gpt2, plain):
    ids = plain.token_ids(2, 7)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            w = net.transformer.wte.weight.save()
        return w

    assert torch.equal(run(gpt2, experiment), gpt2.transformer.wte.weight)


def test_gpt2_invokes_of_different_sizes_equal_running_alone(run, gpt2, plain):
    ids1, ids2 = plain.token_ids(2, 7, seed=1), plain.token_ids(3, 7, seed=2)
    (h1_alone,), y1 = plain.outputs(gpt2, gpt2.transformer.h[0], ids1, use_cache=False)
    (h2_alone,), y2 = plain.outputs(gpt2, gpt2.transformer.h[0], ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                h1, l1 = net.transformer.h[0].output.save(), net.output.logits.save()
            with tracer.invoke(ids2, use_cache=False):
                h2, l2 = net.transformer.h[0].output.save(), net.output.logits.save()
        return h1, l1, h2, l2

    h1, l1, h2, l2 = run(gpt2, experiment)
    assert h1.shape == (2, 7, 32) and h2.shape == (3, 7, 32)
    assert torch.allclose(h1, h1_alone, **TOL) and torch.allclose(h2, h2_alone, **TOL)
    assert torch.allclose(l1, y1.logits, **TOL) and torch.allclose(l2, y2.logits, **TOL)


def test_gpt2_model_output_in_an_invoke_keeps_class_and_rows(run, gpt2, plain):
    ids1, ids2 = plain.token_ids(2, 7, seed=1), plain.token_ids(3, 7, seed=2)
    with torch.no_grad():
        alone = gpt2(ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                pass
            with tracer.invoke(ids2, use_cache=False):
                out = net.output.save()
        return out

    out = run(gpt2, experiment)
    assert type(out) is type(alone)
    assert torch.allclose(out.logits, alone.logits, **TOL)


def test_gpt2_patching_across_invokes(run, gpt2, plain):
    clean, corrupt = plain.token_ids(2, 7, seed=1), plain.token_ids(2, 7, seed=2)
    (clean_h,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], clean, use_cache=False)

    def edit(out):
        out[:, -1] = clean_h[:, -1]
        return out

    ref = plain.edit_output(gpt2, gpt2.transformer.h[0], edit, corrupt, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(clean, use_cache=False):
                h = net.transformer.h[0].output[:, -1]
            with tracer.invoke(corrupt, use_cache=False):
                net.transformer.h[0].output[:, -1] = h
                logits = net.output.logits.save()
        return logits

    assert torch.allclose(run(gpt2, experiment), ref.logits, **TOL)
