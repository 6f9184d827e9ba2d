"""Fidelity: a setter changes the forward pass exactly as a hook returning the edited
value would; saved values are copies no later edit reaches.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import torch
from fidelity import zero_first_column  # tests/runtime/fidelity.py

# --- MLP: setters ---------------------------------------------------------------------


def test_output_setter_equals_hook_returning_value(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], lambda out: out * 2, x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output = net.layers[0].output * 2
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_output_setter_with_a_user_tensor(run, mlp, plain):
    x = plain.randn(4, 8)
    patch = plain.randn(4, 16, seed=7)
    ref = plain.edit_output(mlp, mlp.layers[1], lambda out: patch, x)

    def experiment(net):
        with net.trace(x):
            net.layers[1].output = patch
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inplace_slice_setter_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output[:, 0] = 0
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inplace_add_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], lambda out: out.add_(0.5), x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output += 0.5
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inplace_add_on_slice_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    steer = plain.randn(3, seed=5)

    def edit(out):
        out[:, :3] += steer
        return out

    ref = plain.edit_output(mlp, mlp.layers[2], edit, x)

    def experiment(net):
        with net.trace(x):
            net.layers[2].output[:, :3] += steer
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_input_setter_positional_equals_pre_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_inputs(mlp, mlp.layers[2], lambda a, kw: ((-a[0], *a[1:]), kw), x)

    def experiment(net):
        with net.trace(x):
            net.layers[2].input = -net.layers[2].input
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inputs_setter_positional_equals_pre_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_inputs(mlp, mlp.head, lambda a, kw: ((a[0] * 3,), kw), x)

    def experiment(net):
        with net.trace(x):
            args, kwargs = net.head.inputs
            net.head.inputs = ((args[0] * 3,), kwargs)
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_getter_after_setter_sees_edited_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output = net.layers[0].output * 2
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), orig * 2)


def test_getter_after_inplace_setter_sees_edited_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output[:, 0] = 0
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), zero_first_column(orig.clone()))


def test_saved_value_not_changed_by_later_inplace_edit_at_same_site(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)
    ref = plain.edit_output(mlp, mlp.layers[0], zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            before = net.layers[0].output.save()
            net.layers[0].output[:, 0] = 0
            y = net.output.save()
        return before, y

    before, y = run(mlp, experiment)
    assert torch.equal(before, orig)
    assert torch.equal(y, ref)


def test_saved_value_not_changed_by_inplace_edit_through_its_own_proxy(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)
    ref = plain.edit_output(mlp, mlp.layers[0], zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[0].output.save()
            h[:, 0] = 0  # edits the site (as on a hooked tensor), not the snapshot
            y = net.output.save()
        return h, y

    h, y = run(mlp, experiment)
    assert torch.equal(h, orig)
    assert torch.equal(y, ref)


def test_saved_value_not_changed_by_later_setter_at_same_site(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            before = net.layers[0].output.save()
            net.layers[0].output = torch.zeros(4, 16)
        return before

    assert torch.equal(run(mlp, experiment), orig)
