"""`module.skip(value)`: the module's output is `value` and its forward does not run (nor
anything inside it) — the model continues exactly as if the forward had returned `value`.
Skipping inside one invoke of several runs the forward and replaces that invoke's rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnglass


class Counting(nn.Module):
    """Counts its forward calls; has an inner module to read."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x) * 2


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), Counting(), nn.Linear(8, 4))


def test_skip_replaces_the_output_and_the_forward_never_runs(run, net, plain) -> None:
    x = plain.randn(3, 8)

    def experiment(m: nnglass.NNModel):
        with m.trace(x):
            m[1].skip(m[1].input)
            out = m.output.save()
        return out

    out = run(net, experiment)
    assert net[1].calls == 0 and "forward" not in net[1].__dict__  # the real forward is back
    with torch.no_grad():
        assert torch.equal(out, net[2](net[0](x)))  # as if the middle module were the identity
    net(x)
    assert net[1].calls == 1


def test_a_skip_value_computed_from_the_input_reaches_the_next_module(run, net, plain) -> None:
    x = plain.randn(2, 8)

    def experiment(m: nnglass.NNModel):
        with m.trace(x):
            h = m[1].input
            m[1].skip(h * 3 + 1)
            seen = m[2].input.save()
        return seen

    seen = run(net, experiment)
    with torch.no_grad():
        assert torch.equal(seen, net[0](x) * 3 + 1)
    assert net[1].calls == 0


def test_reading_inside_a_skipped_module_is_an_error_at_that_line(net, plain) -> None:
    m = nnglass.NNModel(net)
    with pytest.raises(nnglass.OutOfOrderError, match=r"1\.inner\.output` call 0 never happened"):
        with m.trace(plain.randn(2, 8)):
            m[1].skip(m[1].input)
            m[1].inner.output.save()
    assert net[1].calls == 0 and "forward" not in net[1].__dict__


def test_a_skip_in_one_invoke_replaces_its_rows_and_the_others_run(run, net, plain) -> None:
    a, b = plain.randn(2, 8, seed=1), plain.randn(3, 8, seed=2)

    def experiment(m: nnglass.NNModel):
        with m.trace() as tracer:
            with tracer.invoke(a):
                m[1].skip(m[1].input)
                out_a = m.output.save()
            with tracer.invoke(b):
                out_b = m.output.save()
        return out_a, out_b

    out_a, out_b = run(net, experiment)
    with torch.no_grad():
        assert torch.allclose(out_a, net[2](net[0](a)), atol=1e-6)
        assert torch.allclose(out_b, net(b), atol=1e-6)
    assert net[1].calls >= 2  # it ran for b's rows (and once more for the reference)


def test_the_policy_sees_a_skip_as_a_write(net, plain) -> None:
    from nnglass.server.config import Policy
    from nnglass.server.policy import check_policy

    rec = nnglass.Recorder()
    m = nnglass.NNModel(net, backend=rec)
    with m.trace(plain.randn(2, 8), remote=True):
        m[1].skip(m[1].input)
    with pytest.raises(nnglass.PolicyError, match=r"writing `1\.output`"):
        check_policy(rec.last, Policy(read=["**"], write=[]), {p for p, _ in net.named_modules()})


def test_skipping_a_llama_decoder_layer_equals_a_hook_returning_its_input(run, llama, plain) -> None:
    ids = plain.token_ids(2, 6)

    def experiment(m: nnglass.NNModel):
        with m.trace(input_ids=ids):
            layer = m.model.layers[1]
            layer.skip(layer.input)
            logits = m.output.logits.save()
        return logits

    logits = run(llama, experiment)

    def identity(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    handle = llama.model.layers[1].register_forward_hook(identity, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = llama(input_ids=ids).logits
    finally:
        handle.remove()
    assert torch.equal(logits, ref)


def test_threads_skipping_and_not_skipping_one_module_each_get_their_own_result(net, plain) -> None:
    import threading

    m = nnglass.NNModel(net)
    x = plain.randn(2, 8)
    with torch.no_grad():
        skipped, full = net[2](net[0](x)), net(x)
    wrong: list[str] = []

    def worker(skip: bool) -> None:
        for _ in range(30):
            with m.trace(x):
                if skip:
                    m[1].skip(m[1].input)
                out = m.output.save()
            if not torch.equal(out, skipped if skip else full):
                wrong.append(f"skip={skip}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in (True, False, True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and "forward" not in net[1].__dict__
