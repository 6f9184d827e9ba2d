"""Early stop, out-of-order detection, concurrency, leaks, errors mid-forward."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

from nnglass import ExecutionError, NNModel, OutOfOrderError


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this layer must never run")


def _stack(n: int = 6, width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_early_stop_never_runs_later_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Boom())
    net = NNModel(model)
    x = torch.randn(2, 4)
    with net.trace(x):
        h = net[1].output.save()
    assert torch.equal(h.value, torch.relu(model[0](x)))
    assert _no_hooks(model)


def test_no_early_stop_when_root_output_or_backward_pending() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Boom())
    net = NNModel(model)
    with pytest.raises(ExecutionError, match="must never run"), net.trace(torch.randn(2, 4)):
        net[0].output.save()
        net.output.save()
    with pytest.raises(ExecutionError, match="must never run"), net.trace(torch.randn(2, 4)):
        net[0].output.grad.save()
        net[1].output.sum().backward()
        net[2].output.save()
    assert _no_hooks(model)


def test_early_stop_cannot_be_swallowed_by_model_code() -> None:
    class Swallow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.ran_after = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                x = self.inner(x)
            except Exception:
                pass
            self.ran_after = True
            return x

    model = Swallow()
    net = NNModel(model)
    with net.trace(torch.randn(1, 4)):
        net.inner.output.save()
    assert model.ran_after is False


def test_out_of_order_names_both_lines() -> None:
    net = NNModel(_stack())
    with pytest.raises(OutOfOrderError) as info, net.trace(torch.randn(2, 8)):
        later = net[4].output  # line A
        net[1].output = later  # line B
    msg = str(info.value)
    assert msg.count(__file__) == 2
    assert _no_hooks(net.module)


def test_module_that_never_runs_is_reported() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = NNModel(WithSpare())
    with pytest.raises(OutOfOrderError, match="never happened"), net.trace(torch.randn(2, 8)):
        net.unused.output.save()


def test_step_that_never_happens_in_a_trace_is_reported() -> None:
    net = NNModel(_stack())
    with pytest.raises(OutOfOrderError, match="step 2 never happened"), net.trace(torch.randn(2, 8)) as tr:
        with tr.step(2):
            net[0].output.save()


def test_threads_trace_one_model_concurrently() -> None:
    model = _stack()
    net = NNModel(model)
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            for k in range(50):
                x = torch.full((2, 8), float(tid * 100 + k))
                scale = float(tid + 1)
                with net.trace(x):
                    net[2].output = net[2].output * scale
                    out = net.output.save()
                    h = net[2].output.save()
                with torch.no_grad():
                    ref_h = model[2](model[1](model[0](x))) * scale
                    ref = model[5](model[4](model[3](ref_h)))
                assert torch.equal(h.value, ref_h)
                assert torch.allclose(out.value, ref, atol=1e-5, rtol=1e-5)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert _no_hooks(model)


def test_error_mid_forward_leaves_model_as_before() -> None:
    model = _stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = NNModel(model)
    with pytest.raises(ExecutionError) as info, net.trace(torch.randn(2, 8)):
        net[1].output.grad.save()
        net[2].output = net[2].output @ torch.randn(3, 3)  # shape error mid-forward
        net.output.sum().backward()
    assert __file__ in str(info.value)
    assert _no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with net.trace(torch.randn(2, 8)):
        ok = net.output.save()
    assert ok.shape == (2, 8)


def test_model_is_collected_after_use() -> None:
    model = _stack()
    net = NNModel(model)
    with net.trace(torch.randn(2, 8)):
        net[0].output.save()
    ref = weakref.ref(model)
    del net, model
    gc.collect()
    assert ref() is None


def test_many_traces_leave_memory_flat() -> None:
    model = _stack(width=64)
    net = NNModel(model)

    def one(i: int) -> None:
        x = torch.randn(16, 64)
        try:
            with net.trace(x):
                net[1].output.grad.save()
                net[2].output[:, 0] = 0
                net[3].output.save()
                if i % 5 == 0:
                    net[4].output = net[4].output @ torch.randn(3, 3)
                net.output.sum().backward()
        except ExecutionError:
            pass

    for i in range(100):
        one(i)
    gc.collect()
    start = _rss_mb()
    for i in range(1000):
        one(i)
    gc.collect()
    assert _rss_mb() - start < 8, "memory grew over 1,000 traces"
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_out_of_order_known_from_an_earlier_run_is_refused_before_running() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), Boom())
    net = NNModel(model)
    with net.trace(torch.randn(2, 8)):  # teaches the order: 0 before 2
        net[0].output.save()
        net[2].output.save()
    with pytest.raises(OutOfOrderError, match="seen in an earlier run") as info, net.trace(torch.randn(2, 8)):
        later = net[2].output
        net[0].output = later
    assert str(info.value).count(__file__) == 2
    assert _no_hooks(model)


def test_saves_are_snapshots_even_when_the_model_edits_outputs_in_place() -> None:
    """Saves are kept by reference while nothing edits them; a model that edits a module's
    output in place after it returns is noticed (version counters), the run is repeated
    with copies once, and later runs of that model copy from the start."""

    class Edits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.runs = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.runs += 1
            h = self.a(x)
            return h.mul_(0)  # in place, after `a`'s hook saw h

    model = Edits()
    net = NNModel(model)
    x = torch.randn(2, 4)
    expected = model.a(x).detach()
    model.runs = 0
    with net.trace(x):
        saved = net.a.output.save()
        net.output.save()
    assert torch.equal(saved.value, expected)
    assert model.runs == 2  # the first run noticed the edit and ran again with copies
    with net.trace(x):
        again = net.a.output.save()
        net.output.save()
    assert torch.equal(again.value, expected) and model.runs == 3  # copies from the start now


def test_a_saved_parameter_is_a_copy() -> None:
    model = _stack()
    net = NNModel(model)
    with net.trace(torch.randn(2, 8)):
        w = net[0].weight.save()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(w.value, model[0].weight)
