"""Errors point at the user's line (docs/reference.md) and leave the model as it was.

Each test provokes one mistake, checks the exception class and that its message ends
with "\\n  at <this file>:<the offending line>", then checks that the model holds no
hooks (the autouse fixture in conftest also checks that, and the weights) and that the
next trace works. Every test runs locally and with the JSON round trip (`make_net`).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import nnglass

HERE = __file__


def next_line() -> int:
    """The line number after the caller's line (put it just above the offending line)."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


def assert_at(err: BaseException, line: int) -> None:
    assert str(err).endswith(f"\n  at {HERE}:{line}"), str(err)


def assert_no_hooks(module: torch.nn.Module) -> None:
    for path, sub in module.named_modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks, f"hook left on {path!r}"


def assert_next_trace_works(net, module, x) -> None:
    assert_no_hooks(module)
    with torch.no_grad():
        ref = module(x)
    with net.trace(x):
        y = net.output.save()
    assert torch.equal(y.value, ref)
    assert_no_hooks(module)


@pytest.fixture
def x(plain) -> torch.Tensor:
    return plain.randn(4, 8)


# --- bad module paths --------------------------------------------------------------------


def test_unknown_submodule_attribute(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[0].nope.output.save()
    assert_at(err.value, line)
    assert "nope" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_unknown_top_level_attribute_lists_submodules(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.encoder.output.save()
    assert_at(err.value, line)
    assert "encoder" in str(err.value) and "layers" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_module_index_out_of_range(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[4].output.save()
    assert_at(err.value, line)
    assert "4" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_negative_module_index_out_of_range(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[-5].output.save()
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


# --- operations that cannot be recorded ----------------------------------------------------


def test_manual_seed_on_a_proxy(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        torch.manual_seed(net.layers[0].output.sum())
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_torch_function_outside_the_registry_is_named(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        torch.as_strided(net.layers[0].output, (2,), (1,))
    assert_at(err.value, line)
    assert "as_strided" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_tensor_method_outside_the_registry_is_named(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[0].output.untyped_storage()
    assert_at(err.value, line)
    assert "untyped_storage" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_numpy_asarray_on_a_proxy(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        np.asarray(net.layers[0].output)
    assert_at(err.value, line)
    assert "numpy" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_numpy_reduction_on_a_proxy_points_at_user_line(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.NNglassError) as err, net.trace(x):
        line = next_line()
        np.mean(net.layers[0].output)
        net.output.save()
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_parameter_cannot_be_edited_in_place(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.NNglassError) as err, net.trace(x):
        line = next_line()
        net.layers[0].weight[:] = 0
        net.output.save()
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


# --- shape errors at run time --------------------------------------------------------------


def test_matmul_shape_error_names_user_line(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.ExecutionError) as err, net.trace(x):
        h = net.layers[0].output
        line = next_line()
        bad = (h @ torch.ones(3, 3)).save()
        ok = net.output.save()
    assert_at(err.value, line)
    assert "RuntimeError" in str(err.value)
    del bad, ok
    assert_next_trace_works(net, mlp, x)


def test_index_error_in_unsaved_value_names_user_line(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.ExecutionError) as err, net.trace(x):
        line = next_line()
        net.layers[0].output[:, 99]
        net.output.save()
    assert_at(err.value, line)
    assert "IndexError" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_wrong_shape_setter_names_setter_line(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.ExecutionError) as err, net.trace(x):
        line = next_line()
        net.layers[0].output = torch.zeros(4, 3)
        net.output.save()
    assert f"{HERE}:{line}" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_model_failure_on_bad_input_leaves_model_clean(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(Exception), net.trace(torch.zeros(4, 5)):  # noqa: B017 - any error
        net.layers[0].output.save()
    assert_next_trace_works(net, mlp, x)


# --- Python control flow on proxies ------------------------------------------------------


def test_if_on_a_proxy_suggests_torch_where(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        if net.layers[0].output.sum() > 0:
            pass
    assert_at(err.value, line)
    assert "torch.where" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_while_on_a_proxy(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        while net.layers[0].output.max() > 100:
            pass
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_iterating_a_value_of_data_dependent_length(make_net, mlp, x):
    # Iterating a value of known length works (tests/tracing); its length must not
    # depend on the data.
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError, match="not known while recording") as err, net.trace(x):
        h = net.layers[0].output.nonzero()
        line = next_line()
        for _row in h:
            pass
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_unpacking_a_value_of_data_dependent_length(make_net, tuple_out, plain):
    x = plain.randn(3, 4)
    net = make_net(tuple_out)
    with pytest.raises(nnglass.TraceError, match="not known while recording") as err, net.trace(x):
        line = next_line()
        _first, _second = net.split.output[0].nonzero()
    assert_at(err.value, line)
    assert_next_trace_works(net, tuple_out, x)


# --- order, calls, values ------------------------------------------------------------------


def test_later_module_output_to_set_earlier_module_names_both_lines(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.OutOfOrderError) as err, net.trace(x):
        late_line = next_line()
        late = net.layers[2].output
        set_line = next_line()
        net.layers[0].output = late
        net.output.save()
    assert_at(err.value, set_line)
    assert f"{HERE}:{late_line}" in str(err.value)
    assert "layers.2" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_out_of_order_through_a_computation(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.OutOfOrderError) as err, net.trace(x):
        late_line = next_line()
        late = net.head.input * 2
        set_line = next_line()
        net.layers[1].output = late
        net.output.save()
    assert_at(err.value, set_line)
    assert f"{HERE}:{late_line}" in str(err.value)
    assert_next_trace_works(net, mlp, x)


def test_value_inside_the_trace(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        h = net.layers[0].output.save()
        line = next_line()
        h.value  # noqa: B018
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_call_index_that_never_happens(make_net, twice, plain):
    x = plain.randn(3, 6)
    net = make_net(twice)
    with pytest.raises(nnglass.OutOfOrderError) as err, net.trace(x):
        line = next_line()
        h = net.block.call(5).output.save()
    assert_at(err.value, line)
    assert "never happened" in str(err.value)
    assert "2 time" in str(err.value)  # says how often the module did run
    del h
    assert_next_trace_works(net, twice, x)


def test_call_index_that_never_happens_does_not_claim_nothing_ran(make_net, twice, plain):
    x = plain.randn(3, 6)
    net = make_net(twice)
    with pytest.raises(nnglass.OutOfOrderError) as err, net.trace(x):
        net.block.call(5).output.save()
    # `block` ran twice; a hint that no hooked module ran at all would mislead.
    assert "no hooked module ran" not in str(err.value)


def test_proxy_from_another_trace(make_net, mlp, x):
    net = make_net(mlp)
    with net.trace(x):
        stale = net.layers[0].output
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[2].output = stale
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_saved_value_from_earlier_trace_is_usable_in_the_next(make_net, mlp, x):
    net = make_net(mlp)
    with net.trace(x):
        h = net.layers[0].output.save()
    with net.trace(x):
        net.layers[0].output = h * 2
        y = net.output.save()
    with torch.no_grad():
        ref = mlp.head(mlp.layers[1:](mlp.layers[0](x) * 2))
    assert torch.equal(y.value, ref)


# --- other misuse ---------------------------------------------------------------------------


def test_user_exception_inside_trace_runs_nothing(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(ValueError, match="mine"), net.trace(x):
        h = net.layers[0].output.save()
        raise ValueError("mine")
    with pytest.raises(nnglass.TraceError):
        h.value  # noqa: B018 - never ran: still a proxy, read outside any trace
    assert_next_trace_works(net, mlp, x)


def test_nested_traces(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        with net.trace(x):
            pass
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_site_outside_a_trace(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err:
        line = next_line()
        net.layers[0].output  # noqa: B018
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_setting_a_module_attribute_inside_a_trace(make_net, mlp, x):
    net = make_net(mlp)
    with pytest.raises(nnglass.TraceError) as err, net.trace(x):
        line = next_line()
        net.layers[0].bias_scale = 2
    assert_at(err.value, line)
    assert_next_trace_works(net, mlp, x)


def test_non_tensor_arguments_must_match_across_invokes(make_net, gpt2, plain):

    ids = plain.token_ids(2, 5)
    net = make_net(gpt2)
    with pytest.raises(nnglass.TraceError) as err, net.trace() as tracer:
        with tracer.invoke(ids, use_cache=False):
            pass
        with tracer.invoke(ids, output_attentions=True, use_cache=False):
            pass
    assert HERE in str(err.value)  # names a line of this file
    with net.trace(ids, use_cache=False):
        logits = net.output.logits.save()
    with torch.no_grad():
        assert torch.equal(logits.value, gpt2(ids, use_cache=False).logits)


def test_value_of_an_unsaved_proxy_says_it_was_not_saved(make_net, mlp, x):
    """After a local run (its job already done) an unsaved value names `.save()`, not a job."""
    net = make_net(mlp)
    with net.trace(x):
        h = net.layers[0].output
    with pytest.raises(nnglass.TraceError, match=r"only for values you called `\.save\(\)` on") as err:
        h.value  # noqa: B018
    assert "job" not in str(err.value)
