"""Fidelity: keyword-only inputs: getters and setters of `.input`/`.inputs` equal pre-hooks with kwargs.

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks (the `plain` fixture in
tests/conftest.py). Rows of an invoke are compared with running alone
within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch
from fidelity import TOL  # tests/runtime/fidelity.py

# --- keyword-only inputs -----------------------------------------------------------------


def test_root_with_keyword_only_inputs(run, kwonly, plain):
    x = plain.randn(4, 5)
    with torch.no_grad():
        ref = kwonly(x=x, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            y = net.output.save()
            root_in = net.input.save()
        return y, root_in

    y, root_in = run(kwonly, experiment)
    assert torch.equal(y, ref)
    assert torch.equal(root_in, x)


def test_keyword_only_input_getter_equals_pre_hook(run, kwonly, plain):
    x = plain.randn(4, 5)
    [(args, kwargs)], _ = plain.inputs(kwonly, kwonly.inner, x=x, scale=0.5)
    assert args == ()

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            h = net.inner.input.save()
        return h

    assert torch.equal(run(kwonly, experiment), kwargs["x"])


def test_keyword_only_input_setter_equals_pre_hook(run, kwonly, plain):
    x = plain.randn(4, 5)
    ref = plain.edit_inputs(kwonly, kwonly.inner, lambda a, kw: (a, {**kw, "x": kw["x"] * 3}),
                      x=x, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            net.inner.input = net.inner.input * 3
            y = net.output.save()
        return y

    assert torch.equal(run(kwonly, experiment), ref)


def test_keyword_only_module_output_setter_equals_hook(run, kwonly, plain):
    x = plain.randn(4, 5)
    ref = plain.edit_output(kwonly, kwonly.inner, lambda out: out - 1, x=x, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            net.inner.output = net.inner.output - 1
            y = net.output.save()
        return y

    assert torch.equal(run(kwonly, experiment), ref)


def test_root_keyword_only_input_setter(run, kwonly, plain):
    x = plain.randn(4, 5)
    with torch.no_grad():
        ref = kwonly(x=x + 1, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            net.input = net.input + 1
            y = net.output.save()
        return y

    assert torch.equal(run(kwonly, experiment), ref)


def test_keyword_only_inputs_getter(run, kwonly, plain):
    x = plain.randn(4, 5)
    [(ref_args, ref_kwargs)], _ = plain.inputs(kwonly, kwonly.inner, x=x, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            args, kwargs = net.inner.inputs
            saved = (args.save(), kwargs.save())
        return saved

    args, kwargs = run(kwonly, experiment)
    assert args == ref_args == ()
    assert set(kwargs) == {"x", "scale"}
    assert torch.equal(kwargs["x"], ref_kwargs["x"])
    assert kwargs["scale"] == ref_kwargs["scale"] == 1.0


def test_keyword_only_inputs_setter_equals_pre_hook(run, kwonly, plain):
    x = plain.randn(4, 5)
    ref = plain.edit_inputs(kwonly, kwonly.inner, lambda a, kw: (a, {"x": kw["x"] + 1, "scale": 3.0}),
                      x=x, scale=0.5)

    def experiment(net):
        with net.trace(x=x, scale=0.5):
            _, kwargs = net.inner.inputs
            net.inner.inputs = ((), {"x": kwargs["x"] + 1, "scale": 3.0})
            y = net.output.save()
        return y

    assert torch.equal(run(kwonly, experiment), ref)


def test_keyword_only_invokes(run, kwonly, plain):
    x1, x2 = plain.randn(2, 5, seed=1), plain.randn(3, 5, seed=2)
    with torch.no_grad():
        alone1, alone2 = kwonly(x=x1, scale=0.5), kwonly(x=x2, scale=0.5)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(x=x1, scale=0.5):
                o1 = net.output.save()
            with tracer.invoke(x=x2, scale=0.5):
                o2 = net.output.save()
        return o1, o2

    o1, o2 = run(kwonly, experiment)
    assert torch.allclose(o1, alone1, **TOL) and torch.allclose(o2, alone2, **TOL)
