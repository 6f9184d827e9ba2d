"""`.source` on any module: operations inside a forward, counted per call of the module and
inclusive of what it calls. Each value is checked against plain PyTorch (the same
computation done by hand on the input a forward pre-hook saw, or a monkeypatched softmax),
locally and after a JSON round trip (`run`)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnglass
from nnglass.errors import ExecutionError, PolicyError, TraceError
from nnglass.runtime.backend import LocalBackend
from nnglass.runtime.limits import RunLimits


class Mixer(nn.Module):
    """Attention without projections: scores, softmax, mix; plus a product with its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(torch.matmul(x, x.transpose(-1, -2)), dim=-1)  # matmul_0, softmax_0
        return probs @ x + torch.matmul(x, self.w.t())  # matmul_1, matmul_2


def mixer_by_hand(m: Mixer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    scores = torch.matmul(x, x.transpose(-1, -2))
    probs = F.softmax(scores, dim=-1)
    return {"scores": scores, "probs": probs, "mixed": probs @ x}


class Twice(nn.Module):
    """One mixer called twice, a ReLU between."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = Mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.relu(self.mix(x)))


@pytest.fixture
def net() -> Twice:
    torch.manual_seed(0)
    return Twice()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 5, 8)


def inputs_seen(net: Twice, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handle = net.mix.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    return seen


def test_reads_per_call_and_inclusive_of_what_a_forward_calls(run: Any, net: Twice, x: torch.Tensor) -> None:
    def experiment(m: nnglass.NNModel) -> Any:
        with m.trace(x):
            ops = m.mix.source
            first = ops.softmax_0.output.save()
            scores = ops.matmul_0.output.save()
            second = ops.softmax_0.call(1).output.save()
            mixed_in = ops.matmul_1.call(1).inputs  # (args, kwargs): probs @ x
            probs_in = mixed_in[0][0].save()
            outer = m.source.softmax_1.output.save()  # the root counts both calls' softmaxes
            assert first.shape == (2, 5, 5) and isinstance(first, torch.Tensor)  # known while recording
        return first, scores, second, probs_in, outer

    first, scores, second, probs_in, outer = run(net, experiment)
    a, b = inputs_seen(net, x)
    ref_a, ref_b = mixer_by_hand(net.mix, a), mixer_by_hand(net.mix, b)
    assert torch.equal(first, ref_a["probs"]) and torch.equal(scores, ref_a["scores"])
    assert torch.equal(second, ref_b["probs"]) and torch.equal(probs_in, ref_b["probs"])
    assert torch.equal(outer, ref_b["probs"])


def test_setting_an_output_and_an_input(run: Any, net: Twice, x: torch.Tensor,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform attention in the second call (the softmax's output replaced), and the first
    call's scores halved (the softmax's input replaced): as a patched softmax does it."""

    def experiment(m: nnglass.NNModel) -> Any:
        with m.trace(x):
            ops = m.mix.source
            ops.softmax_0.input = ops.softmax_0.input / 2
            uniform = torch.full((2, 5, 5), 0.2)
            ops.softmax_0.call(1).output = uniform
            out = m.output.save()
        return out

    got = run(net, experiment)
    calls = [0]
    real = F.softmax

    def softmax(scores: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return real(scores / 2, *args, **kwargs)
        return torch.full((2, 5, 5), 0.2)

    monkeypatch.setattr(F, "softmax", softmax)
    with torch.no_grad():
        ref = net(x)
    monkeypatch.undo()
    assert calls[0] == 2 and torch.equal(got, ref)


def test_the_gradient_of_an_operations_output(run: Any, net: Twice, x: torch.Tensor,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def experiment(m: nnglass.NNModel) -> Any:
        with m.trace(x):
            g = m.mix.source.softmax_0.call(1).output.grad.save()  # the second call: through w
            m.output.sum().backward()
        return g

    got = run(net, experiment)
    kept: list[torch.Tensor] = []
    real = F.softmax

    def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        kept.append(out)
        return out

    monkeypatch.setattr(F, "softmax", softmax)
    out = net(x)
    monkeypatch.undo()
    (ref,) = torch.autograd.grad(out.sum(), [kept[1]])
    assert torch.equal(got, ref)


def test_a_name_the_forward_does_not_make_is_an_error_at_the_users_line(net: Twice, x: torch.Tensor) -> None:
    m = nnglass.NNModel(net)
    assert "names are <op>_<n>" in repr(m.mix.source)  # a plain module's inputs are unknown outside a trace
    with pytest.raises(TraceError, match=r"makes no call 'softmax_1'; it makes: matmul_0, softmax_0, "
                                         r"matmul_1, matmul_2") as err:
        with m.trace(x):
            line = f"{__file__}:{sys._getframe().f_lineno + 1}"
            m.mix.source.softmax_1.output.save()
    assert err.value.where == line
    with pytest.raises(TraceError, match="with <op> one of softmax"):
        with m.trace(x):
            m.mix.source.linear_0.output.save()


def test_hidden_weights_keep_a_weight_operand_out(net: Twice, x: torch.Tensor) -> None:
    """`matmul(x, w.t())` inside a forward: its inputs hold a view of a parameter."""
    m = nnglass.NNModel(net)
    hidden = nnglass.NNModel(net, backend=LocalBackend(m, limits=RunLimits(hide_weights=True)))
    with hidden.trace(x, remote=True):
        ok = hidden.mix.source.softmax_0.output.save()
    assert torch.equal(ok.value, mixer_by_hand(net.mix, x)["probs"])
    with pytest.raises((PolicyError, ExecutionError), match="holds a weight of the model"):
        with hidden.trace(x, remote=True):
            hidden.mix.source.matmul_2.inputs[0][1].save()
