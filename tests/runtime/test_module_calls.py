"""Fidelity: modules called on proxies and parameter reads equal the same modules and weights used by hand.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import torch

# --- MLP: modules called on proxies, parameters ----------------------------------------


def test_module_call_on_proxy_equals_module_on_hooked_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (hidden,), _ = plain.outputs(mlp, mlp.layers[1], x)
    with torch.no_grad():
        ref = mlp.head(hidden)

    def experiment(net):
        with net.trace(x):
            lens = net.head(net.layers[1].output).save()
        return lens

    assert torch.equal(run(mlp, experiment), ref)


def test_module_call_on_proxy_does_not_count_as_a_call_of_that_module(run, mlp, plain):
    x = plain.randn(4, 8)
    (head_out,), _ = plain.outputs(mlp, mlp.head, x)

    def experiment(net):
        with net.trace(x):
            lens = net.head(net.layers[1].output * 0).save()
            real = net.head.output.save()
        return lens, real

    lens, real = run(mlp, experiment)
    assert torch.equal(real, head_out)
    assert torch.equal(lens, mlp.head.bias.detach().expand(4, 4))


def test_parameter_read_equals_weight(run, mlp, plain):
    x = plain.randn(4, 8)

    def experiment(net):
        with net.trace(x):
            w = net.layers[0].weight.save()
            b = net.head.bias.save()
        return w, b

    w, b = run(mlp, experiment)
    assert torch.equal(w, mlp.layers[0].weight)
    assert torch.equal(b, mlp.head.bias)
    assert w.data_ptr() != mlp.layers[0].weight.data_ptr()  # a snapshot, not the parameter


def test_parameters_in_ops_reproduce_module_output(run, mlp, plain):
    x = plain.randn(4, 8)
    (head_out,), _ = plain.outputs(mlp, mlp.head, x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[-1].output
            manual = torch.nn.functional.linear(h, net.head.weight, net.head.bias).save()
        return manual

    assert torch.equal(run(mlp, experiment), head_out)
