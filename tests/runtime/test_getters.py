"""Fidelity: a getter returns exactly what a plain forward hook (or pre-hook) sees.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import torch

# --- MLP: getters ---------------------------------------------------------------------


def test_output_getter_equals_forward_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), ref)


def test_negative_index_addresses_last_submodule(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[3], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[-1].output.save()
        return h

    assert torch.equal(run(mlp, experiment), ref)


def test_root_output_equals_plain_forward(run, mlp, plain):
    x = plain.randn(4, 8)
    with torch.no_grad():
        ref = mlp(x)

    def experiment(net):
        with net.trace(x):
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_input_getter_equals_pre_hook_first_positional(run, mlp, plain):
    x = plain.randn(4, 8)
    [(args, _)], _ = plain.inputs(mlp, mlp.layers[2], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[2].input.save()
        return h

    assert torch.equal(run(mlp, experiment), args[0])


def test_inputs_getter_is_args_kwargs_pair(run, mlp, plain):
    x = plain.randn(4, 8)
    [(ref_args, ref_kwargs)], _ = plain.inputs(mlp, mlp.layers[2], x)

    def experiment(net):
        with net.trace(x):
            args, kwargs = net.layers[2].inputs
            saved = (args.save(), kwargs.save())
        return saved

    args, kwargs = run(mlp, experiment)
    assert type(args) is tuple and len(args) == 1
    assert torch.equal(args[0], ref_args[0])
    assert kwargs == ref_kwargs == {}


def test_root_input_is_the_model_input(run, mlp, plain):
    x = plain.randn(4, 8)

    def experiment(net):
        with net.trace(x):
            h = net.input.save()
        return h

    assert torch.equal(run(mlp, experiment), x)


def test_saved_proxy_behaves_like_its_value(make_net, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)
    net = make_net(mlp)
    with net.trace(x):
        h = net.layers[0].output.save()
    assert torch.equal(h.value, ref)
    assert h.shape == ref.shape
    assert torch.equal(h[0], ref[0])
    assert torch.allclose(h, ref)
    assert torch.equal(h + 1, ref + 1)


def test_computed_value_equals_same_ops_on_hooked_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[1], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[1].output
            stats = (h.sum(dim=-1).save(), torch.softmax(h, dim=-1)[:, :3].save(), (h * 2 - 1).save())
        return stats

    total, soft, affine = run(mlp, experiment)
    assert torch.equal(total, ref.sum(dim=-1))
    assert torch.equal(soft, torch.softmax(ref, dim=-1)[:, :3])
    assert torch.equal(affine, ref * 2 - 1)
