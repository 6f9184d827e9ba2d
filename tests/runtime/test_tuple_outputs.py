"""Fidelity: tuple outputs stay tuples; edits of their elements equal hooks.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py).
"""

from __future__ import annotations

import torch

# --- tuple outputs -------------------------------------------------------------------------


def test_tuple_output_stays_a_tuple(run, tuple_out, plain):
    x = plain.randn(3, 4)
    (ref,), _ = plain.outputs(tuple_out, tuple_out.split, x)

    def experiment(net):
        with net.trace(x):
            out = net.split.output.save()
            first = net.split.output[0].save()
        return out, first

    out, first = run(tuple_out, experiment)
    assert type(out) is tuple and len(out) == 2
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(first, ref[0])


def test_tuple_output_setter_equals_hook(run, tuple_out, plain):
    x = plain.randn(3, 4)
    ref = plain.edit_output(tuple_out, tuple_out.split, lambda out: (out[0] * 2, out[1]), x)

    def experiment(net):
        with net.trace(x):
            out = net.split.output
            net.split.output = (out[0] * 2, out[1])
            y = net.output.save()
        return y

    assert torch.equal(run(tuple_out, experiment), ref)


def test_inplace_edit_of_tuple_element_equals_hook(run, tuple_out, plain):
    x = plain.randn(3, 4)

    def edit(out):
        out[1][:, 0] = 0
        return out

    ref = plain.edit_output(tuple_out, tuple_out.split, edit, x)

    def experiment(net):
        with net.trace(x):
            net.split.output[1][:, 0] = 0
            y = net.output.save()
        return y

    assert torch.equal(run(tuple_out, experiment), ref)


def test_saved_tuple_not_changed_by_later_inplace_edit(run, tuple_out, plain):
    x = plain.randn(3, 4)
    (ref,), _ = plain.outputs(tuple_out, tuple_out.split, x)

    def experiment(net):
        with net.trace(x):
            before = net.split.output.save()
            net.split.output[0][:] = 7.0
            after = net.split.output[0].save()
        return before, after

    before, after = run(tuple_out, experiment)
    assert torch.equal(before[0], ref[0]) and torch.equal(before[1], ref[1])
    assert torch.equal(after, torch.full_like(ref[0], 7.0))
