"""Fidelity: a module called twice: `.call(i)` addresses each call as hooks see them.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py). Rows of an invoke are compared with running alone
within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch
from fidelity import TOL  # tests/runtime/fidelity.py

# --- a module called twice -------------------------------------------------------------


def test_call_indices_equal_each_hook_call(run, twice, plain):
    x = plain.randn(3, 6)
    (first, second), _ = plain.outputs(twice, twice.block, x)

    def experiment(net):
        with net.trace(x):
            c0 = net.block.call(0).output.save()
            c1 = net.block.call(1).output.save()
            default = net.block.output.save()
        return c0, c1, default

    c0, c1, default = run(twice, experiment)
    assert torch.equal(c0, first)
    assert torch.equal(c1, second)
    assert torch.equal(default, first)


def test_second_call_input_equals_pre_hook(run, twice, plain):
    x = plain.randn(3, 6)
    [_, (args1, _)], _ = plain.inputs(twice, twice.block, x)

    def experiment(net):
        with net.trace(x):
            h = net.block.call(1).input.save()
        return h

    assert torch.equal(run(twice, experiment), args1[0])


def test_setter_on_second_call_only(run, twice, plain):
    x = plain.randn(3, 6)
    ref = plain.edit_output(twice, twice.block, lambda out: out + 1, x, call=1)

    def experiment(net):
        with net.trace(x):
            net.block.call(1).output = net.block.call(1).output + 1
            y = net.output.save()
        return y

    assert torch.equal(run(twice, experiment), ref)


def test_setter_on_first_call_reaches_second_call_input(run, twice, plain):
    x = plain.randn(3, 6)
    (first, _), _ = plain.outputs(twice, twice.block, x)
    ref = plain.edit_output(twice, twice.block, lambda out: out * 3, x, call=0)

    def experiment(net):
        with net.trace(x):
            net.block.call(0).output = net.block.call(0).output * 3
            h = net.block.call(1).input.save()
            y = net.output.save()
        return h, y

    h, y = run(twice, experiment)
    assert torch.equal(h, torch.relu(first * 3))
    assert torch.equal(y, ref)


def test_call_indices_inside_invokes_see_their_rows(run, twice, plain):
    x1, x2 = plain.randn(2, 6, seed=1), plain.randn(1, 6, seed=2)
    (a_first, a_second), _ = plain.outputs(twice, twice.block, x1)
    (b_first, b_second), _ = plain.outputs(twice, twice.block, x2)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x1):
                a = (net.block.call(0).output.save(), net.block.call(1).output.save())
            with tracer.invoke(x2):
                b = (net.block.call(0).output.save(), net.block.call(1).output.save())
        return a, b

    (a0, a1), (b0, b1) = run(twice, experiment)
    assert torch.allclose(a0, a_first, **TOL) and torch.allclose(a1, a_second, **TOL)
    assert torch.allclose(b0, b_first, **TOL) and torch.allclose(b1, b_second, **TOL)
