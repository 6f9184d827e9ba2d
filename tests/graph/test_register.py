"""`nnglass.register`: a function outside the default registry, allowed in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import nnglass
from nnglass.graph.ops import REGISTRY


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """The process registry without torch.sinc (another test may have registered it),
    restored exactly afterwards."""
    ops, names = dict(REGISTRY._ops), dict(REGISTRY._names)
    REGISTRY._ops.pop("torch.sinc", None)
    REGISTRY._names = {k: v for k, v in names.items() if v != "torch.sinc"}
    yield
    REGISTRY._ops, REGISTRY._names = ops, names


def test_a_registered_torch_function_records_and_runs(clean_registry: None) -> None:
    net = nnglass.NNModel(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with pytest.raises(nnglass.NNglassError, match="sinc"):
        with net.trace(x):
            torch.sinc(net.output).save()
    nnglass.register(torch.sinc)
    assert "torch.sinc" in REGISTRY
    with net.trace(x):
        y = torch.sinc(net.output).save()
    with torch.no_grad():
        assert torch.equal(y.value, torch.sinc(net.module(x)))


def test_a_scripts_function_gets_a_valid_default_name(clean_registry: None) -> None:
    def fn(t: torch.Tensor) -> torch.Tensor:
        return t * 2

    fn.__module__, fn.__qualname__ = "__main__", "double"  # as if defined in a script
    nnglass.register(fn)
    assert REGISTRY["main.double"] is fn
