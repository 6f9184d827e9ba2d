"""Record-time metadata and mixed real/proxy arithmetic on any module (NNModel).

Each experiment is written the way nnsight users write it (shapes in Python control
flow, `isinstance` to untuple, real tensors' methods taking proxies) and checked against
plain PyTorch hooks, locally and after a JSON round trip (`run`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nnglass
from nnglass.tracing.proxy import Proxy


def test_shape_dtype_device_and_type_are_real_while_recording(run, mlp, plain):
    x = plain.randn(3, 8)
    seen: dict = {}

    def experiment(net):
        with net.trace(x):
            h = net.layers[0].output
            seen.update(shape=h.shape, dtype=h.dtype, device=h.device, ndim=h.ndim, len=len(h),
                        size=h.size(), last=h.size(-1), numel=h.numel(), dim=h.dim(),
                        tensor=isinstance(h, torch.Tensor), tuple=isinstance(h, tuple),
                        floating=h.is_floating_point(), type=type(h))
            assert h.shape[-1] == 16 and tuple(h.shape) == (3, 16)
            out = net.output.save()
        return out

    run(mlp, experiment)
    assert seen == dict(shape=torch.Size([3, 16]), dtype=torch.float32, device=torch.device("cpu"), ndim=2,
                        len=3, size=torch.Size([3, 16]), last=16, numel=48, dim=2, tensor=True, tuple=False,
                        floating=True, type=Proxy)


def test_loop_over_positions_and_rows(run, mlp, plain):
    """`for i in range(h.shape[0])` and `for row in h` record one node per row."""
    x = plain.randn(4, 8)

    def experiment(net):
        with net.trace(x):
            h = net.layers[2].output
            norms = [h[i].norm().save() for i in range(h.shape[0])]
            rows = [row.sum().save() for row in h]
        return norms, rows

    norms, rows = run(mlp, experiment)
    (ref,), _ = plain.outputs(mlp, mlp.layers[2], x)
    assert torch.equal(torch.stack(norms), torch.stack([ref[i].norm() for i in range(4)]))
    assert torch.equal(torch.stack(rows), torch.stack([r.sum() for r in ref]))


def test_untuple_with_isinstance_and_unpack(run, tuple_out, plain):
    """The nnsight idiom: `out = m.output; h = out[0] if isinstance(out, tuple) else out`."""
    x = plain.randn(3, 4)

    def experiment(net):
        with net.trace(x):
            out = net.split.output
            assert isinstance(out, tuple) and not isinstance(out, torch.Tensor) and len(out) == 2
            h = out[0] if isinstance(out, tuple) else out
            a, b = net.split.output
            h[:, 0] = 0  # edits the tuple's first element, in place
            y = net.output.save()
            ab = nnglass.save([a, b])
        return y, ab

    y, ab = run(tuple_out, experiment)

    def edit(out):
        out[0][:, 0] = 0
        return out

    assert torch.equal(y, plain.edit_output(tuple_out, tuple_out.split, edit, x))
    (ref,), _ = plain.outputs(tuple_out, tuple_out.split, x)
    assert isinstance(ab, list) and torch.equal(ab[1], ref[1])


def test_saved_values_answer_isinstance_for_their_value_after_the_block(tuple_out, plain):
    """Code written for nnsight checks saved values' types after the block too."""
    net = nnglass.NNModel(tuple_out)
    with net.trace(plain.randn(3, 4)):
        pair = net.split.output.save()
        h = net.split.output[0].save()
    assert isinstance(pair, tuple) and not isinstance(pair, torch.Tensor) and len(pair) == 2
    assert isinstance(h, torch.Tensor) and not isinstance(h, tuple)
    first = pair[0] if isinstance(pair, tuple) else pair
    assert torch.equal(first, h) and torch.equal(torch.cat([h, h]), torch.cat([h.value, h.value]))


def test_control_flow_on_shapes_but_not_on_data(mlp, plain):
    x = plain.randn(2, 8)
    net = nnglass.NNModel(mlp)
    with net.trace(x):
        h = net.layers[0].output
        if tuple(h.shape) != (2, 16):
            raise AssertionError("shape")
        out = net.output.save()
    assert out.shape == (2, 4)
    with pytest.raises(nnglass.TraceError, match=r"torch\.where"), net.trace(x):
        if net.layers[0].output.sum() > 0:
            pass


def test_mixed_real_and_proxy_arithmetic(run, mlp, plain):
    """Real tensors' methods with proxy arguments, torch functions on mixes (lists too),
    scalars and real tensors on either side of operators."""
    x = plain.randn(2, 8)
    vec, W = plain.randn(16, seed=3), plain.randn(5, 16, seed=4)

    def experiment(net):
        with net.trace(x):
            h = net.layers[2].output
            v = vec.to(device=h.device, dtype=h.dtype)
            out = {
                "dot": v.dot(h[0]), "mv": W.mv(h[0]), "lerp": v.lerp(h[0], 0.25), "max": v.maximum(h[1]),
                "outer": v.outer(h[1]), "stack": torch.stack([h[0], v, h[1]]), "linear": F.linear(h, W),
                "scaled": 0.5 * h * v, "rsub": v - h, "cat": torch.cat((h, v[None])),
            }
            saved = nnglass.save(out)
        return saved

    got = run(mlp, experiment)
    (h,), _ = plain.outputs(mlp, mlp.layers[2], x)
    want = {
        "dot": vec.dot(h[0]), "mv": W.mv(h[0]), "lerp": vec.lerp(h[0], 0.25), "max": vec.maximum(h[1]),
        "outer": vec.outer(h[1]), "stack": torch.stack([h[0], vec, h[1]]), "linear": F.linear(h, W),
        "scaled": 0.5 * h * vec, "rsub": vec - h, "cat": torch.cat((h, vec[None])),
    }
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_torch_tensor_of_a_proxy_is_recorded_not_a_crash(mlp, plain):
    """isinstance(p, torch.Tensor) is True while recording; torch's C code must still
    never take a proxy for a real tensor."""
    x = plain.randn(2, 8)
    net = nnglass.NNModel(mlp)
    with net.trace(x):
        h = net.layers[0].output
        assert isinstance(h, torch.Tensor)
        with pytest.raises(nnglass.TraceError, match="as_tensor"):
            torch.as_tensor(h)  # not in the registry: a clear error, never a crash
        t = torch.tensor(h).save()
        r = torch.ones(16)[torch.tensor([1, 2])]  # real tensors still run as usual
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)
    assert torch.equal(t.value, ref) and torch.equal(r, torch.ones(2))
    assert not isinstance(h, torch.Tensor), "after the trace a proxy is no tensor"


def test_a_trace_that_never_asks_runs_no_fake_forward(mlp, plain, monkeypatch):
    from nnglass.models import fake

    calls = []
    real = fake.capture
    monkeypatch.setattr(fake, "capture", lambda *a: calls.append(1) or real(*a))
    net = nnglass.NNModel(mlp)
    x = plain.randn(2, 8)
    with net.trace(x):
        net.layers[0].output[:, 0] = 0
        net.output.save()
    assert calls == []
    for _ in range(3):  # asking: one fake forward per input signature
        with net.trace(x):
            assert net.layers[0].output.shape == (2, 16)
    assert calls == [1]
    with net.trace(plain.randn(5, 8)):
        assert net.layers[0].output.shape == (5, 16)
    assert calls == [1, 1]


def test_invokes_see_their_own_rows(mlp, plain):
    net = nnglass.NNModel(mlp)
    with net.trace() as tracer:
        with tracer.invoke(plain.randn(2, 8)):
            a = net.layers[0].output.shape
        with tracer.invoke(plain.randn(3, 8, seed=5)):
            b = net.layers[0].output.shape
        with tracer.invoke():
            whole = net.layers[0].output.shape
    assert (a, b, whole) == ((2, 16), (3, 16), (5, 16))


def test_data_dependent_metadata_raises_at_the_line(mlp, plain):
    net = nnglass.NNModel(mlp)
    with pytest.raises(nnglass.TraceError, match="not known while recording"), net.trace(plain.randn(2, 8)):
        net.layers[0].output.nonzero().shape  # noqa: B018


def test_a_shape_error_shows_when_the_shape_is_asked(mlp, plain):
    net = nnglass.NNModel(mlp)
    x = plain.randn(2, 8)
    with pytest.raises(nnglass.TraceError, match="gives no value on these shapes"), net.trace(x):
        (net.layers[0].output @ torch.ones(3, 3)).shape  # noqa: B018


def test_tracer_stop_ends_the_block(mlp, plain):
    x = plain.randn(2, 8)
    net = nnglass.NNModel(mlp)
    after = []
    with net.trace(x) as tracer:
        h = net.layers[0].output.save()
        tracer.stop()
        after.append(1)  # never runs, as in nnsight
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)
    assert after == [] and torch.equal(h.value, ref)


def test_no_grad_inside_a_trace_changes_nothing(run, mlp, plain):
    x = plain.randn(2, 8)

    def experiment(net):
        with net.trace(x):
            with torch.no_grad():
                net.layers[0].output[:, 0] = 0
            h = net.layers[0].output
            g = h.grad.save()
            net.output.sum().backward()
        return g

    g = run(mlp, experiment)
    seen = []

    def edit(m, a, out):
        out = out.clone()
        out[:, 0] = 0
        out.retain_grad()
        seen.append(out)
        return out

    handle = mlp.layers[0].register_forward_hook(edit)
    try:
        y = mlp(x)
    finally:
        handle.remove()
    ref = torch.autograd.grad(y.sum(), seen[0])[0]
    assert torch.equal(g, ref)
