"""Fidelity: a getter returns exactly what a plain forward hook sees; a setter changes the
forward pass exactly as a hook returning the edited value would (docs/reference.md).

Every experiment runs locally and after a JSON round trip (the `run` fixture), with
bitwise-equal results; the reference is plain PyTorch hooks from conftest. Invokes are
compared with running alone within float tolerance (batch size changes rounding).
"""

from __future__ import annotations

import torch

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- MLP: getters ---------------------------------------------------------------------


def test_output_getter_equals_forward_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), ref)


def test_negative_index_addresses_last_submodule(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[3], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[-1].output.save()
        return h

    assert torch.equal(run(mlp, experiment), ref)


def test_root_output_equals_plain_forward(run, mlp, plain):
    x = plain.randn(4, 8)
    with torch.no_grad():
        ref = mlp(x)

    def experiment(net):
        with net.trace(x):
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_input_getter_equals_pre_hook_first_positional(run, mlp, plain):
    x = plain.randn(4, 8)
    [(args, _)], _ = plain.inputs(mlp, mlp.layers[2], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[2].input.save()
        return h

    assert torch.equal(run(mlp, experiment), args[0])


def test_inputs_getter_is_args_kwargs_pair(run, mlp, plain):
    x = plain.randn(4, 8)
    [(ref_args, ref_kwargs)], _ = plain.inputs(mlp, mlp.layers[2], x)

    def experiment(net):
        with net.trace(x):
            args, kwargs = net.layers[2].inputs
            saved = (args.save(), kwargs.save())
        return saved

    args, kwargs = run(mlp, experiment)
    assert type(args) is tuple and len(args) == 1
    assert torch.equal(args[0], ref_args[0])
    assert kwargs == ref_kwargs == {}


def test_root_input_is_the_model_input(run, mlp, plain):
    x = plain.randn(4, 8)

    def experiment(net):
        with net.trace(x):
            h = net.input.save()
        return h

    assert torch.equal(run(mlp, experiment), x)


def test_saved_proxy_behaves_like_its_value(make_net, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[0], x)
    net = make_net(mlp)
    with net.trace(x):
        h = net.layers[0].output.save()
    assert torch.equal(h.value, ref)
    assert h.shape == ref.shape
    assert torch.equal(h[0], ref[0])
    assert torch.allclose(h, ref)
    assert torch.equal(h + 1, ref + 1)


def test_computed_value_equals_same_ops_on_hooked_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (ref,), _ = plain.outputs(mlp, mlp.layers[1], x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[1].output
            stats = (h.sum(dim=-1).save(), torch.softmax(h, dim=-1)[:, :3].save(), (h * 2 - 1).save())
        return stats

    total, soft, affine = run(mlp, experiment)
    assert torch.equal(total, ref.sum(dim=-1))
    assert torch.equal(soft, torch.softmax(ref, dim=-1)[:, :3])
    assert torch.equal(affine, ref * 2 - 1)


# --- MLP: setters ---------------------------------------------------------------------


def test_output_setter_equals_hook_returning_value(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], lambda out: out * 2, x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output = net.layers[0].output * 2
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_output_setter_with_a_user_tensor(run, mlp, plain):
    x = plain.randn(4, 8)
    patch = plain.randn(4, 16, seed=7)
    ref = plain.edit_output(mlp, mlp.layers[1], lambda out: patch, x)

    def experiment(net):
        with net.trace(x):
            net.layers[1].output = patch
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def _zero_first_column(out):
    out[:, 0] = 0
    return out


def test_inplace_slice_setter_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], _zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output[:, 0] = 0
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inplace_add_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_output(mlp, mlp.layers[0], lambda out: out.add_(0.5), x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output += 0.5
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inplace_add_on_slice_equals_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    steer = plain.randn(3, seed=5)

    def edit(out):
        out[:, :3] += steer
        return out

    ref = plain.edit_output(mlp, mlp.layers[2], edit, x)

    def experiment(net):
        with net.trace(x):
            net.layers[2].output[:, :3] += steer
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_input_setter_positional_equals_pre_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_inputs(mlp, mlp.layers[2], lambda a, kw: ((-a[0], *a[1:]), kw), x)

    def experiment(net):
        with net.trace(x):
            net.layers[2].input = -net.layers[2].input
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_inputs_setter_positional_equals_pre_hook(run, mlp, plain):
    x = plain.randn(4, 8)
    ref = plain.edit_inputs(mlp, mlp.head, lambda a, kw: ((a[0] * 3,), kw), x)

    def experiment(net):
        with net.trace(x):
            args, kwargs = net.head.inputs
            net.head.inputs = ((args[0] * 3,), kwargs)
            y = net.output.save()
        return y

    assert torch.equal(run(mlp, experiment), ref)


def test_getter_after_setter_sees_edited_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output = net.layers[0].output * 2
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), orig * 2)


def test_getter_after_inplace_setter_sees_edited_value(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            net.layers[0].output[:, 0] = 0
            h = net.layers[0].output.save()
        return h

    assert torch.equal(run(mlp, experiment), _zero_first_column(orig.clone()))


def test_saved_value_not_changed_by_later_inplace_edit_at_same_site(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)
    ref = plain.edit_output(mlp, mlp.layers[0], _zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            before = net.layers[0].output.save()
            net.layers[0].output[:, 0] = 0
            y = net.output.save()
        return before, y

    before, y = run(mlp, experiment)
    assert torch.equal(before, orig)
    assert torch.equal(y, ref)


def test_saved_value_not_changed_by_inplace_edit_through_its_own_proxy(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)
    ref = plain.edit_output(mlp, mlp.layers[0], _zero_first_column, x)

    def experiment(net):
        with net.trace(x):
            h = net.layers[0].output.save()
            h[:, 0] = 0  # edits the site (as on a hooked tensor), not the snapshot
            y = net.output.save()
        return h, y

    h, y = run(mlp, experiment)
    assert torch.equal(h, orig)
    assert torch.equal(y, ref)


def test_saved_value_not_changed_by_later_setter_at_same_site(run, mlp, plain):
    x = plain.randn(4, 8)
    (orig,), _ = plain.outputs(mlp, mlp.layers[0], x)

    def experiment(net):
        with net.trace(x):
            before = net.layers[0].output.save()
            net.layers[0].output = torch.zeros(4, 16)
        return before

    assert torch.equal(run(mlp, experiment), orig)


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
    edited2 = plain.edit_output(mlp, mlp.layers[0], _zero_first_column, x2)

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


# --- CNN with an in-place ReLU after the hooked conv -------------------------------------


def test_conv_output_saved_before_inplace_relu(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (ref,), _ = plain.outputs(cnn, cnn.conv, x)  # cloned inside the hook
    assert (ref < 0).any()  # the ReLU really would change it

    def experiment(net):
        with net.trace(x):
            h = net.conv.output.save()
            y = net.output.save()
        return h, y

    h, y = run(cnn, experiment)
    assert torch.equal(h, ref)
    with torch.no_grad():
        assert torch.equal(y, cnn(x))


def test_conv_output_used_after_inplace_relu_keeps_hook_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)
    (pool_ref,), _ = plain.outputs(cnn, cnn.pool, x)

    def experiment(net):
        with net.trace(x):
            both = torch.cat([net.conv.output.flatten(1), net.pool.output.flatten(1)], dim=1)
            saved = both.save()
        return saved

    ref = torch.cat([conv_ref.flatten(1), pool_ref.flatten(1)], dim=1)
    assert torch.equal(run(cnn, experiment), ref)


def test_relu_input_getter_is_pre_relu_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)

    def experiment(net):
        with net.trace(x):
            h = net.relu.input.save()
        return h

    assert torch.equal(run(cnn, experiment), conv_ref)


def test_relu_output_getter_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (ref,), _ = plain.outputs(cnn, cnn.relu, x)

    def experiment(net):
        with net.trace(x):
            h = net.relu.output.save()
        return h

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_output_setter_before_inplace_relu_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    ref = plain.edit_output(cnn, cnn.conv, lambda out: out * -1, x)

    def experiment(net):
        with net.trace(x):
            net.conv.output = net.conv.output * -1
            y = net.output.save()
        return y

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_inplace_slice_setter_equals_hook(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)

    def edit(out):
        out[:, 1] = 2.0
        return out

    ref = plain.edit_output(cnn, cnn.conv, edit, x)

    def experiment(net):
        with net.trace(x):
            net.conv.output[:, 1] = 2.0
            y = net.output.save()
        return y

    assert torch.equal(run(cnn, experiment), ref)


def test_conv_saved_value_survives_setter_and_inplace_relu(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (conv_ref,), _ = plain.outputs(cnn, cnn.conv, x)

    def experiment(net):
        with net.trace(x):
            before = net.conv.output.save()
            net.conv.output[:, 0] = -5.0
            after = net.conv.output.save()
        return before, after

    before, after = run(cnn, experiment)
    assert torch.equal(before, conv_ref)
    expected = conv_ref.clone()
    expected[:, 0] = -5.0
    assert torch.equal(after, expected)


def test_cnn_module_call_on_proxy_equals_module_on_hooked_value(run, cnn, plain):
    x = plain.randn(2, 3, 8, 8)
    (pooled,), _ = plain.outputs(cnn, cnn.pool, x)
    with torch.no_grad():
        ref = cnn.fc(pooled.flatten(1))

    def experiment(net):
        with net.trace(x):
            logits = net.fc(net.pool.output.flatten(1)).save()
        return logits

    assert torch.equal(run(cnn, experiment), ref)


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
                      x=x, scale=0.5)  # fmt: skip

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
                      x=x, scale=0.5)  # fmt: skip

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


# --- GPT-2 -------------------------------------------------------------------------------


def test_gpt2_block_output_is_a_tensor_equal_to_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (ref,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.transformer.h[0].output.save()
            row0 = net.transformer.h[0].output[0].save()
        return h, row0

    h, row0 = run(gpt2, experiment)
    assert isinstance(h, torch.Tensor) and torch.equal(h, ref)
    assert torch.equal(row0, ref[0])


def test_gpt2_attention_tuple_output_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (ref,), _ = plain.outputs(gpt2, gpt2.transformer.h[1].attn, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.transformer.h[-1].attn.output.save()
        return out

    out = run(gpt2, experiment)
    assert type(out) is tuple and len(out) == len(ref)
    assert torch.equal(out[0], ref[0])
    assert out[1] is None and ref[1] is None


def test_gpt2_block_inputs_equal_pre_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    [(ref_args, ref_kwargs)], _ = plain.inputs(gpt2, gpt2.transformer.h[1], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            args, kwargs = net.transformer.h[1].inputs
            saved = (args.save(), kwargs.save())
            first = net.transformer.h[1].input.save()
        return saved, first

    (args, kwargs), first = run(gpt2, experiment)
    assert len(args) == len(ref_args)
    assert torch.equal(args[0], ref_args[0]) and torch.equal(first, ref_args[0])
    assert all(a is None for a in args[1:]) and all(a is None for a in ref_args[1:])
    assert set(kwargs) == set(ref_kwargs)
    for k, v in ref_kwargs.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(kwargs[k], v), k
        else:
            assert kwargs[k] == v, k


def test_gpt2_model_output_keeps_its_class(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    with torch.no_grad():
        ref = gpt2(ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.output.save()
            logits = net.output.logits.save()
        return out, logits

    out, logits = run(gpt2, experiment)
    assert type(out) is type(ref)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(logits, ref.logits)


def test_gpt2_steering_last_token_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    steer = plain.randn(32, seed=9)

    def edit(out):
        out[:, -1] += steer
        return out

    ref = plain.edit_output(gpt2, gpt2.transformer.h[0], edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.transformer.h[0].output[:, -1] += steer
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(gpt2, experiment), ref.logits)


def test_gpt2_mlp_output_setter_equals_hook(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    ref = plain.edit_output(gpt2, gpt2.transformer.h[1].mlp, lambda out: out * 0, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.transformer.h[1].mlp.output = net.transformer.h[1].mlp.output * 0
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(gpt2, experiment), ref.logits)


def test_gpt2_logit_lens_equals_modules_on_hooked_value(run, gpt2, plain):
    ids = plain.token_ids(2, 7)
    (hidden,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], ids, use_cache=False)
    with torch.no_grad():
        ref = gpt2.lm_head(gpt2.transformer.ln_f(hidden))

    def experiment(net):
        with net.trace(ids, use_cache=False):
            lens = net.lm_head(net.transformer.ln_f(net.transformer.h[0].output)).save()
        return lens

    assert torch.equal(run(gpt2, experiment), ref)


def test_gpt2_embedding_weight_read(run, gpt2, plain):
    ids = plain.token_ids(2, 7)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            w = net.transformer.wte.weight.save()
        return w

    assert torch.equal(run(gpt2, experiment), gpt2.transformer.wte.weight)


def test_gpt2_invokes_of_different_sizes_equal_running_alone(run, gpt2, plain):
    ids1, ids2 = plain.token_ids(2, 7, seed=1), plain.token_ids(3, 7, seed=2)
    (h1_alone,), y1 = plain.outputs(gpt2, gpt2.transformer.h[0], ids1, use_cache=False)
    (h2_alone,), y2 = plain.outputs(gpt2, gpt2.transformer.h[0], ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                h1, l1 = net.transformer.h[0].output.save(), net.output.logits.save()
            with tracer.invoke(ids2, use_cache=False):
                h2, l2 = net.transformer.h[0].output.save(), net.output.logits.save()
        return h1, l1, h2, l2

    h1, l1, h2, l2 = run(gpt2, experiment)
    assert h1.shape == (2, 7, 32) and h2.shape == (3, 7, 32)
    assert torch.allclose(h1, h1_alone, **TOL) and torch.allclose(h2, h2_alone, **TOL)
    assert torch.allclose(l1, y1.logits, **TOL) and torch.allclose(l2, y2.logits, **TOL)


def test_gpt2_model_output_in_an_invoke_keeps_class_and_rows(run, gpt2, plain):
    ids1, ids2 = plain.token_ids(2, 7, seed=1), plain.token_ids(3, 7, seed=2)
    with torch.no_grad():
        alone = gpt2(ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                pass
            with tracer.invoke(ids2, use_cache=False):
                out = net.output.save()
        return out

    out = run(gpt2, experiment)
    assert type(out) is type(alone)
    assert torch.allclose(out.logits, alone.logits, **TOL)


def test_gpt2_patching_across_invokes(run, gpt2, plain):
    clean, corrupt = plain.token_ids(2, 7, seed=1), plain.token_ids(2, 7, seed=2)
    (clean_h,), _ = plain.outputs(gpt2, gpt2.transformer.h[0], clean, use_cache=False)

    def edit(out):
        out[:, -1] = clean_h[:, -1]
        return out

    ref = plain.edit_output(gpt2, gpt2.transformer.h[0], edit, corrupt, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(clean, use_cache=False):
                h = net.transformer.h[0].output[:, -1]
            with tracer.invoke(corrupt, use_cache=False):
                net.transformer.h[0].output[:, -1] = h
                logits = net.output.logits.save()
        return logits

    assert torch.allclose(run(gpt2, experiment), ref.logits, **TOL)


# --- Llama -------------------------------------------------------------------------------


def test_llama_layer_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.layers[1], ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.model.layers[-1].output.save()
        return h

    assert torch.equal(run(llama, experiment), ref)


def test_llama_attention_input_passed_by_keyword_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    [(args, kwargs)], _ = plain.inputs(llama, llama.model.layers[0].self_attn, ids, use_cache=False)
    assert args == () and "hidden_states" in kwargs  # transformers passes it by keyword

    def experiment(net):
        with net.trace(ids, use_cache=False):
            h = net.model.layers[0].self_attn.input.save()
        return h

    assert torch.equal(run(llama, experiment), kwargs["hidden_states"])


def test_llama_attention_keyword_input_setter_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(a, kw):
        return a, {**kw, "hidden_states": kw["hidden_states"] * 0.5}

    ref = plain.edit_inputs(llama, llama.model.layers[0].self_attn, edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            attn = net.model.layers[0].self_attn
            attn.input = attn.input * 0.5
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(llama, experiment), ref.logits)


def test_llama_attention_tuple_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.layers[0].self_attn, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            out = net.model.layers[0].self_attn.output.save()
        return out

    out = run(llama, experiment)
    assert type(out) is tuple and len(out) == len(ref)
    assert torch.equal(out[0], ref[0])


def test_llama_rotary_embedding_tuple_output_equals_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (ref,), _ = plain.outputs(llama, llama.model.rotary_emb, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            cos, sin = net.model.rotary_emb.output[0].save(), net.model.rotary_emb.output[1].save()
        return cos, sin

    cos, sin = run(llama, experiment)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])


def test_llama_down_proj_input_index_setter_equals_pre_hook(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(a, kw):
        a[0][:, -1, [3, 7]] = 10
        return a, kw

    ref = plain.edit_inputs(llama, llama.model.layers[1].mlp.down_proj, edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.model.layers[1].mlp.down_proj.input[:, -1, [3, 7]] = 10
            logits = net.output.logits.save()
        return logits

    assert torch.equal(run(llama, experiment), ref.logits)


def test_llama_inplace_slice_setter_on_layer_output(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def edit(out):
        out[:, -1] = 0
        return out

    ref = plain.edit_output(llama, llama.model.layers[0], edit, ids, use_cache=False)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            net.model.layers[0].output[:, -1] = 0
            after = net.model.layers[0].output[:, -1].save()
            logits = net.output.logits.save()
        return after, logits

    after, logits = run(llama, experiment)
    assert torch.equal(after, torch.zeros(2, 32))
    assert torch.equal(logits, ref.logits)


def test_llama_logit_lens_equals_modules_on_hooked_value(run, llama, plain):
    ids = plain.token_ids(2, 6)
    (hidden,), _ = plain.outputs(llama, llama.model.layers[0], ids, use_cache=False)
    with torch.no_grad():
        ref = llama.lm_head(llama.model.norm(hidden))

    def experiment(net):
        with net.trace(ids, use_cache=False):
            lens = net.lm_head(net.model.norm(net.model.layers[0].output)).save()
        return lens

    assert torch.equal(run(llama, experiment), ref)


def test_llama_buffer_read(run, llama, plain):
    ids = plain.token_ids(2, 6)

    def experiment(net):
        with net.trace(ids, use_cache=False):
            inv_freq = net.model.rotary_emb.inv_freq.save()
        return inv_freq

    assert torch.equal(run(llama, experiment), llama.model.rotary_emb.inv_freq)


def test_llama_invokes_of_different_sizes_equal_running_alone(run, llama, plain):
    ids1, ids2 = plain.token_ids(1, 6, seed=1), plain.token_ids(3, 6, seed=2)
    (h1_alone,), y1 = plain.outputs(llama, llama.model.layers[0], ids1, use_cache=False)
    (h2_alone,), y2 = plain.outputs(llama, llama.model.layers[0], ids2, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(ids1, use_cache=False):
                h1, l1 = net.model.layers[0].output.save(), net.output.logits.save()
            with tracer.invoke(ids2, use_cache=False):
                h2, l2 = net.model.layers[0].output.save(), net.output.logits.save()
        return h1, l1, h2, l2

    h1, l1, h2, l2 = run(llama, experiment)
    assert h1.shape == (1, 6, 32) and h2.shape == (3, 6, 32)
    assert torch.allclose(h1, h1_alone, **TOL) and torch.allclose(h2, h2_alone, **TOL)
    assert torch.allclose(l1, y1.logits, **TOL) and torch.allclose(l2, y2.logits, **TOL)


def test_llama_patching_across_invokes(run, llama, plain):
    clean, corrupt = plain.token_ids(2, 6, seed=1), plain.token_ids(2, 6, seed=2)
    (clean_h,), _ = plain.outputs(llama, llama.model.layers[0], clean, use_cache=False)
    ref = plain.edit_output(llama, llama.model.layers[0], lambda out: clean_h, corrupt, use_cache=False)

    def experiment(net):
        with net.trace() as tracer:
            with tracer.invoke(clean, use_cache=False):
                h = net.model.layers[0].output
            with tracer.invoke(corrupt, use_cache=False):
                net.model.layers[0].output = h
                logits = net.output.logits.save()
        return logits

    assert torch.allclose(run(llama, experiment), ref.logits, **TOL)
