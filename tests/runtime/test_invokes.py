"""Fidelity: each invoke sees and edits only its own rows, and equals running alone.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py). Rows of an invoke are compared with running alone
within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch
from fidelity import TOL, zero_first_column  # tests/runtime/fidelity.py

# --- invokes (MLP) --------------------------------------------------------------------


def test_invokes_of_different_sizes_see_only_their_rows(run, mlp, plain):
    x1, x2 = plain.randn(2, 8, seed=1), plain.randn(3, 8, seed=2)
    (alone1,), y1 = plain.outputs(mlp, mlp.layers[0], x1)
    (alone2,), y2 = plain.outputs(mlp, mlp.layers[0], x2)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x1):
                h1, o1 = net.layers[0].output.save(), net.output.save()
            with tracer.invoke(x2):
                h2, o2 = net.layers[0].output.save(), net.output.save()
        return h1, o1, h2, o2

    h1, o1, h2, o2 = run(mlp, experiment)
    assert h1.shape == (2, 16) and h2.shape == (3, 16)
    assert o1.shape == (2, 4) and o2.shape == (3, 4)
    assert torch.allclose(h1, alone1, **TOL) and torch.allclose(h2, alone2, **TOL)
    assert torch.allclose(o1, y1, **TOL) and torch.allclose(o2, y2, **TOL)


def test_setter_in_one_invoke_leaves_the_other_alone(run, mlp, plain):
    x1, x2 = plain.randn(2, 8, seed=1), plain.randn(3, 8, seed=2)
    with torch.no_grad():
        alone2 = mlp(x2)
    edited1 = plain.edit_output(mlp, mlp.layers[0], lambda out: out * 0, x1)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x1):
                net.layers[0].output = net.layers[0].output * 0
                o1 = net.output.save()
            with tracer.invoke(x2):
                o2 = net.output.save()
        return o1, o2

    o1, o2 = run(mlp, experiment)
    assert torch.allclose(o1, edited1, **TOL)
    assert torch.allclose(o2, alone2, **TOL)


def test_inplace_edit_in_invoke_touches_only_its_rows(run, mlp, plain):
    x1, x2 = plain.randn(2, 8, seed=1), plain.randn(3, 8, seed=2)
    with torch.no_grad():
        alone1 = mlp(x1)
    edited2 = plain.edit_output(mlp, mlp.layers[0], zero_first_column, x2)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x1):
                o1 = net.output.save()
            with tracer.invoke(x2):
                net.layers[0].output[:, 0] = 0
                o2 = net.output.save()
        return o1, o2

    o1, o2 = run(mlp, experiment)
    assert torch.allclose(o1, alone1, **TOL)
    assert torch.allclose(o2, edited2, **TOL)


def test_patching_across_invokes(run, mlp, plain):
    clean, corrupt = plain.randn(2, 8, seed=1), plain.randn(2, 8, seed=2)
    (clean_h,), _ = plain.outputs(mlp, mlp.layers[0], clean)
    ref = plain.edit_output(mlp, mlp.layers[0], lambda out: clean_h, corrupt)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(clean):
                h = net.layers[0].output
            with tracer.invoke(corrupt):
                net.layers[0].output = h
                patched = net.output.save()
        return patched

    assert torch.allclose(run(mlp, experiment), ref, **TOL)


def test_invoke_without_input_sees_the_whole_batch(run, mlp, plain):
    x1, x2 = plain.randn(2, 8, seed=1), plain.randn(3, 8, seed=2)
    (whole,), _ = plain.outputs(mlp, mlp.layers[0], torch.cat([x1, x2]))

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x1):
                pass
            with tracer.invoke(x2):
                pass
            with tracer.invoke():
                h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), whole)
