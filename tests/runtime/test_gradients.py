"""Gradients: `.grad` getters/setters and `.backward()` equal torch.autograd on a plain forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnglass import NNModel, OutOfOrderError, TraceError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def _plain_grads(model: nn.Module, x: torch.Tensor, loss_fn, sites: list[int]) -> list[torch.Tensor]:
    acts: dict[int, torch.Tensor] = {}
    handles = [model[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o)) for i in sites]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return list(torch.autograd.grad(loss_fn(out), [acts[i] for i in sites]))


def _assert_params_untouched(model: nn.Module) -> None:
    for p in model.parameters():
        assert p.grad is None
        assert p.requires_grad


def test_grad_of_activation_equals_autograd() -> None:
    model, x = _mlp(), torch.randn(4, 5)
    net = NNModel(model)
    with net.trace(x):
        g0 = net[0].output.grad.save()
        g2 = net[2].output.grad.save()
        net.output.sum().backward()
    ref0, ref2 = _plain_grads(model, x, lambda o: o.sum(), [0, 2])
    assert torch.equal(g0.value, ref0)
    assert torch.equal(g2.value, ref2)
    _assert_params_untouched(model)


def test_grad_of_input_and_custom_gradient() -> None:
    model, x = _mlp(), torch.randn(4, 5)
    net = NNModel(model)
    seed = torch.randn(4, 3)
    with net.trace(x):
        g = net[2].input.grad.save()
        net.output.backward(seed)
    acts = {}
    h = model[2].register_forward_pre_hook(lambda m, a: acts.__setitem__("in", a[0]))
    out = model(x)
    h.remove()
    (ref,) = torch.autograd.grad(out, [acts["in"]], grad_outputs=[seed])
    assert torch.equal(g.value, ref)


def test_grad_setter_changes_gradients_upstream() -> None:
    model, x = _mlp(), torch.randn(4, 5)
    net = NNModel(model)
    with net.trace(x):
        g0 = net[0].output.grad.save()
        net[2].output.grad = net[2].output.grad * 0  # blocks all gradient flow
        net.output.sum().backward()
    assert torch.count_nonzero(g0.value) == 0

    # Same edit as a plain tensor hook.
    acts = {}

    def keep(m, a, o):
        acts["o0"] = o

    def zero(m, a, o):
        o.register_hook(lambda g: g * 0)

    hs = [model[0].register_forward_hook(keep), model[2].register_forward_hook(zero)]
    out = model(x)
    for h in hs:
        h.remove()
    (ref,) = torch.autograd.grad(out.sum(), [acts["o0"]])
    assert torch.equal(g0.value, ref)


def test_two_backwards_in_one_trace() -> None:
    model, x = _mlp(), torch.randn(4, 5)
    net = NNModel(model)
    with net.trace(x):
        out = net.output
        g_a = net[2].output.grad.save()
        out[:, 0].sum().backward()
        g_b = net[0].output.grad.save()
        out[:, 1].sum().backward()
    ref_a = _plain_grads(model, x, lambda o: o[:, 0].sum(), [2])[0]
    ref_b = _plain_grads(model, x, lambda o: o[:, 1].sum(), [0])[0]
    assert torch.equal(g_a.value, ref_a)
    assert torch.equal(g_b.value, ref_b)
    _assert_params_untouched(model)


def test_gradients_with_invokes_slice_rows() -> None:
    model = _mlp()
    x1, x2 = torch.randn(2, 5), torch.randn(3, 5)
    net = NNModel(model)
    with net.trace() as tracer:
        with tracer.invoke(x1):
            g1 = net[2].output.grad.save()
        with tracer.invoke(x2):
            g2 = net[2].output.grad.save()
        with tracer.invoke():
            net.output.sum().backward()
    (ref,) = _plain_grads(model, torch.cat([x1, x2]), lambda o: o.sum(), [2])
    assert torch.equal(g1.value, ref[:2])
    assert torch.equal(g2.value, ref[2:])


def test_frozen_model_still_gives_activation_gradients() -> None:
    model, x = _mlp(), torch.randn(4, 5)
    for p in model.parameters():
        p.requires_grad_(False)
    net = NNModel(model)
    with net.trace(x):
        g = net[2].output.grad.save()
        net.output.sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    # Reference: the gradient of sum(head(tanh(h))) w.r.t. h, computed by hand-made leaf.
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
    h = h.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model[4](model[3](h)).sum(), [h])
    assert torch.equal(g.value, ref)


def test_grad_declared_after_backward_is_a_clear_error() -> None:
    net = NNModel(_mlp())
    with pytest.raises(TraceError, match="declare it before the backward") as info:
        with net.trace(torch.randn(2, 5)):
            net.output.sum().backward()
            net[0].output.grad.save()
    assert __file__ in str(info.value)


def test_grad_not_reached_by_backward_is_reported() -> None:
    net = NNModel(_mlp())
    with pytest.raises(OutOfOrderError, match="gradient was never computed"):
        with net.trace(torch.randn(2, 5)):
            g = net[4].output.grad.save()
            net[2].output.sum().backward()  # layer 4 is after layer 2: no gradient reaches it
            del g
    assert not any(m._forward_hooks for m in net.module.modules())
