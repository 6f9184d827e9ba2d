"""Every registry op, sized before it runs, over generated shapes and dtypes.

The ops are not hand-picked: the tests iterate `REGISTRY`, so an op added there is
covered (or makes `test_every_op_has_a_call` fail until CALLS says how to call it).
For each op and each generated input (1 to 3 dims of 1 to 4, six dtypes; two per op
in CI):
- `op_size` (computed before the op runs, never allocating its result) is at least what
  the op really makes (`made_bytes` of its real output): the pre-check never lets an
  op make more than it was told;
- in a graph run with limits (LimitedInterpreter; on the first input that makes
  bytes): `op_bytes` one byte under that size refuses it before it runs, at its line;
  a live-memory budget one byte under refuses it too; a run past its deadline stops
  before it runs (TimeLimitError). Each refusal leaves the interpreter usable: the same
  graph then runs with no limits and gives what the plain call gives (in the worker,
  the same process serves the next job).
`result_bytes` is the worker's check on the encoded result (tests/server/test_worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_limits import Build, Spied

from nnglass.errors import ResourceLimitError, TimeLimitError
from nnglass.graph.ir import Ref
from nnglass.graph.ops import REGISTRY
from nnglass.runtime.sizes import PYTHON_NAMESPACES, made_bytes, op_size
from saved_values import assert_bitwise_equal

# Ops whose meta kernel refuses some arguments the CPU kernel accepts (nll_loss of a 1-D
# input): op_size says "fails" (None), the op runs, and the interpreter's check after it
# bounds op_bytes (runtime/limited.py). A pre-check gap, listed so a new one fails here.
META_STRICTER = frozenset({"torch.nn.functional.nll_loss"})
# F.dropout samples (training=True by default) from the process-wide generator: a defect
# of the registry (ops.py leaves random sampling out on purpose), reported, not fixed here.
RANDOM = frozenset({"torch.nn.functional.dropout"})
Call = Callable[[torch.Tensor], tuple[tuple, dict]]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def _idx(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=torch.long)


def _one(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.long)


# Ways to call an op on one generated tensor `x`; each op uses the first that works on a
# float, int or bool tensor of 2 or 3 dims (found at import, `CALLS`).
TEMPLATES: list[Call] = [
    lambda x: ((x,), {}),
    lambda x: ((x, x.clone()), {}),
    lambda x: ((x, -1), {}),
    lambda x: ((x, 1), {}),
    lambda x: ((x, 1.5), {}),
    lambda x: ((x, 0, 0, 1), {}),
    lambda x: ((x, 0, -1), {}),
    lambda x: ((x, -1, _idx(x)), {}),
    lambda x: ((x, -1, _idx(x), x.clone()), {}),
    lambda x: ((x, 0, _one(x)), {}),
    lambda x: ((x, 0, _one(x), 1), {}),
    lambda x: ((x, x > 0, 1), {}),
    lambda x: ((x, x > 0), {}),
    lambda x: ((x > 0, x, x.clone()), {}),
    lambda x: ((x, _idx(x)), {}),
    lambda x: ((x, _idx(x), -1), {}),
    lambda x: ((x, x.clone(), 0.5), {}),
    lambda x: ((x, tuple(x.shape)), {}),
    lambda x: ((x, *x.shape), {}),
    lambda x: ((x, *([2] * x.ndim)), {}),
    lambda x: ((x, tuple(reversed(range(x.ndim)))), {}),
    lambda x: (([x, x.clone()],), {}),
    lambda x: ((tuple(x.shape),), {}),
    lambda x: ((tuple(x.shape), 1.5), {}),
    lambda x: ((x.numel(),), {}),
    lambda x: ((0, 1, x.numel()), {}),
    lambda x: ((x, x.mT.clone()), {}),
    lambda x: ((x @ x.mT, x, x.mT.clone()), {}),
    lambda x: ((x.flatten(), x.flatten().clone()), {}),
    lambda x: (("i,j->ij", x.flatten(), x.flatten()), {}),
    lambda x: ((x, (x.shape[-1],)), {}),
    lambda x: ((x, x.flatten().sort().values), {}),
    lambda x: ((x.flatten().sort().values, x), {}),
    lambda x: ((_idx(x), x.reshape(-1, x.shape[-1])), {}),
    lambda x: ((x, torch.zeros(x.shape[0], dtype=torch.long)), {}),
    lambda x: ((x, 0, (x.shape[0], 1)), {}),
    lambda x: ((x, torch.float64), {}),
    lambda x: ((x, (1, 1)), {}),
    lambda x: ((x, slice(0, 1)), {}),
    lambda x: ((x, 0, x[0].clone()), {}),
    lambda x: ((x, x[..., :1].clone()), {}),
    lambda x: ((x.tolist(),), {}),
    lambda x: ((x.flatten()[:1].clone(),), {}),
    lambda x: ((x, "shape"), {}),
    lambda x: (([("a", x)],), {}),
    lambda x: ((0, x.shape[0]), {}),
    lambda x: ((x.shape[0], 0), {}),
    lambda x: ((), {}),
    lambda x: ((x.flatten()[:3].clone(), x.flatten()[:3].clone()), {}),
]


def _find_call(fn: Callable[..., Any]) -> int | None:
    for i, template in enumerate(TEMPLATES):
        for dtype in (torch.float32, torch.int64, torch.bool):
            for shape in ((2, 3), (2, 3, 4), (3, 3)):
                x = torch.arange(1, 1 + torch.Size(shape).numel()).reshape(shape).to(dtype)
                try:
                    args, kwargs = template(x)
                    fn(*args, **kwargs)
                except Exception:
                    continue
                return i
    return None


NAMES = sorted(n for n in REGISTRY.names() if n != "get")
CALLS = {name: _find_call(REGISTRY[name]) for name in NAMES}
Spy = Spied()


def test_every_op_has_a_call() -> None:
    """A registry op the tests below cannot call is an op whose size no test checks: add
    a template that calls it (TEMPLATES)."""
    assert not [n for n, i in CALLS.items() if i is None]


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


def _build(name: str, args: tuple, kwargs: dict) -> tuple[Build, Ref]:
    """A graph applying `name` to these arguments, tensors attached."""
    b = Build()

    def attach(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return b.attach(v)
        if isinstance(v, (list, tuple)):
            return type(v)(attach(y) for y in v)
        return v

    return b, b.add(name, *attach(args), save=True, **{k: attach(v) for k, v in kwargs.items()})


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(y) for y in x)
    return x


@pytest.mark.parametrize("name", [n for n in NAMES if CALLS[n] is not None])
def test_sized_before_it_runs_and_refused_over_each_limit(name: str) -> None:
    fn, template = REGISTRY[name], TEMPLATES[CALLS[name]]  # type: ignore[index]
    limited: list[str] = []

    @settings(max_examples=2, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(shapes, st.sampled_from(DTYPES), st.integers(0, 2**31))
    def prop(shape: list[int], dtype: torch.dtype, seed: int) -> None:
        torch.manual_seed(seed)
        x = (torch.randn(shape) * 3).to(dtype)
        try:
            args, kwargs = template(x)
            given_args, given_kwargs = _clone(args), _clone(kwargs)  # in-place ops edit these
            out = fn(*given_args, **given_kwargs)
        except Exception:
            assume(False)  # not a valid call on this shape or dtype
            return
        made = made_bytes(out, (given_args, given_kwargs))
        size = op_size(name, fn, _clone(args), _clone(kwargs), 1 << 62)
        after = size is None
        if after:  # the meta kernel refuses what the CPU kernel runs: sized after it runs
            assert name in META_STRICTER, "sized as failing, yet it runs"
            size = made
        # Tensor bytes are exact; Python objects are counted roughly (runtime/python_sizes.py).
        slack = 64 if name.startswith(PYTHON_NAMESPACES) else 0
        assert size >= made - slack, (size, made)
        if made == 0 or name.startswith("builtins.getattr") or limited:
            return  # the graph runs below: once per op (they cost a few meta runs each)
        limited.append(name)
        b, ref = _build(name, args, kwargs)
        spied = Spy.registry
        Spy.calls.clear()
        for limits in ({"op_bytes": size - 1}, {"live_bytes": size - 1}):
            with pytest.raises(ResourceLimitError) as info:
                b.run(registry=spied, **limits)
            assert info.value.where == b.where(ref), (limits, info.value)
            assert after or name not in Spy.calls, (limits, Spy.calls)  # refused before it ran
        Spy.calls.clear()
        with pytest.raises(TimeLimitError):
            b.run(registry=spied, seconds=-1.0)
        assert name not in Spy.calls
        # The same graph then runs, and gives what the plain call gives.
        again = b.run()[ref.id]
        if name in RANDOM:
            return
        if isinstance(out, dict):  # dict(rows of a tensor): its keys are new tensors each run
            again, out = list(again.values()), list(out.values())
        try:  # NaN where the op's domain ends (acos(3), std of one element) is NaN again
            torch.testing.assert_close(again, out, rtol=0, atol=0, equal_nan=True)
        except (TypeError, RuntimeError):  # a value assert_close does not compare (a dict of tensors)
            assert_bitwise_equal(again, out)

    prop()
