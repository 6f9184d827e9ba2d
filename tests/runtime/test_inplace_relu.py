"""Fidelity: a conv followed by an in-place ReLU: getters and setters see the hook-time
value, not the ReLU's later edit.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import torch

# --- CNN with an in-place ReLU after the hooked conv -------------------------------------


def test_conv_output_saved_before_inplace_relu(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (ref,), _ = plain.outputs(cnn, cnn.conv, x)  # cloned inside the hook
    assert (ref < 0).any()  # the ReLU really would change it

    def experiment(net):
        with net.trace(x):
            h = net.conv.output.save()
            y = net.output.save()
        return h, y

    h, y = run(cnn, experiment)
    assert torch.equal(h, ref)
    with torch.no_grad():
        assert torch.equal(y, cnn(x))


def test_conv_output_used_after_inplace_relu_keeps_hook_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)
    (pool_ref,), _ = plain.outputs(cnn, cnn.pool, x)

    def experiment(net):
        with net.trace(x):
            both = torch.cat([net.conv.output.flatten(1), net.pool.output.flatten(1)], dim=1)
            saved = both.save()
        return saved

    ref = torch.cat([conv_ref.flatten(1), pool_ref.flatten(1)], dim=1)
    assert torch.equal(run(cnn, experiment), ref)


def test_relu_input_getter_is_pre_relu_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)

    def experiment(net):
        with net.trace(x):
            h = net.relu.input.save()
        return h

    assert torch.equal(run(cnn, experiment), conv_ref)


def test_relu_output_getter_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (ref,), _ = plain.outputs(cnn, cnn.relu, x)

    def experiment(net):
        with net.trace(x):
            h = net.relu.output.save()
        return h

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_output_setter_before_inplace_relu_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    ref = plain.edit_output(cnn, cnn.conv, lambda out: out * -1, x)

    def experiment(net):
        with net.trace(x):
            net.conv.output = net.conv.output * -1
            y = net.output.save()
        return y

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_inplace_slice_setter_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)

    def edit(out):
        out[:, 1] = 2.0
        return out

    ref = plain.edit_output(cnn, cnn.conv, edit, x)

    def experiment(net):
        with net.trace(x):
            net.conv.output[:, 1] = 2.0
            y = net.output.save()
        return y

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_saved_value_survives_setter_and_inplace_relu(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)

    def experiment(net):
        with net.trace(x):
            before = net.conv.output.save()
            net.conv.output[:, 0] = -5.0
            after = net.conv.output.save()
        return before, after

    before, after = run(cnn, experiment)
    assert torch.equal(before, conv_ref)
    expected = conv_ref.clone()
    expected[:, 0] = -5.0
    assert torch.equal(after, expected)


def test_cnn_module_call_on_proxy_equals_module_on_hooked_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (pooled,), _ = plain.outputs(cnn, cnn.pool, x)
    with torch.no_grad():
        ref = cnn.fc(pooled.flatten(1))

    def experiment(net):
        with net.trace(x):
            logits = net.fc(net.pool.output.flatten(1)).save()
        return logits

    assert torch.equal(run(cnn, experiment), ref)
