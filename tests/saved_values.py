"""Comparing saved values: the helpers every test suite here shares (local vs JSON round
trip, local vs remote)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def unwrap(x: Any) -> Any:
    """Saved proxies (and structures of them) as plain values."""
    from nnglass.tracing.proxy import Saved

    if isinstance(x, Saved):
        return x.value
    if type(x) in (tuple, list):
        return type(x)(unwrap(y) for y in x)
    if type(x) is dict:
        return {k: unwrap(v) for k, v in x.items()}
    return x


def assert_bitwise_equal(a: Any, b: Any, where: str = "value") -> None:
    """Same structure and types; tensors bitwise equal (dtype and shape included)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, Mapping):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"
