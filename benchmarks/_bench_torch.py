"""Overhead worker for the two references that need no tracing library.

- ``plain``: scenario ``null`` times a plain forward of one copy of the model against the pristine
  copy every scenario is paired with. Its "overhead" should be ~0; anything else is the method's
  own bias and noise on this machine.
- ``hooks``: each scenario written by hand with ``register_forward_hook`` (register, forward,
  remove, every call): what a careful user pays without any framework. On the MLP, ``save_all``
  under ``hooks`` is the ``hooks_floor``: twelve hooks keeping every block's output.
  ``early3`` is the manual early stop: a hook on ``layers[3]`` keeps its output and raises an
  exception that ends the forward; ``full3`` (its baseline) keeps it and lets the forward finish.
  (``grad`` needs no hooks row: its baseline already is the hand-written version.)

Run by ``overhead.py`` in ``/work/main/.venv``; prints one JSON line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from _harness import EARLY_LAYER, GET_SET_LAYER, Scenario, main_tensor, parse_args, run_worker
from _models import Bench


def _with_hooks(bench: Bench, hooks: dict[int, Callable[..., Any]]) -> Any:
    layers = bench.layers()
    handles = [layers[i].register_forward_hook(fn) for i, fn in hooks.items()]
    try:
        return bench.forward()
    finally:
        for handle in handles:
            handle.remove()


def save1(bench: Bench) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    _with_hooks(bench, {bench.save1_layer: lambda _m, _a, out: kept.append(out)})
    return kept[0]


def save1_second_site(bench: Bench) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    _with_hooks(bench, {bench.save1_layer: lambda _m, _a, out: kept.append(out)})
    return kept[0]


def save1_out(bench: Bench) -> list[torch.Tensor]:
    kept: list[torch.Tensor] = []
    out = _with_hooks(bench, {bench.save1_layer: lambda _m, _a, out: kept.append(out)})
    return [kept[0], main_tensor(out)]


def save_all(bench: Bench) -> list[torch.Tensor]:
    """The hooks floor: a hook on every block, keeping its output."""
    kept: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Callable[..., None]:
        return lambda _m, _a, out: kept.__setitem__(i, out)

    _with_hooks(bench, {i: keep(i) for i in range(bench.n_layers)})
    return [kept[i] for i in range(bench.n_layers)]


def get_set_save(bench: Bench) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    _with_hooks(
        bench,
        {
            GET_SET_LAYER: lambda _m, _a, out: out * 2,
            GET_SET_LAYER + 1: lambda _m, _a, out: kept.append(out),
        },
    )
    return kept[0]


class _Stop(BaseException):
    """Raised by a hook to end the forward pass (BaseException: model code may catch Exception)."""


def early3(bench: Bench) -> torch.Tensor:
    kept: list[torch.Tensor] = []

    def keep_and_stop(_m: Any, _a: Any, out: torch.Tensor) -> None:
        kept.append(out)
        raise _Stop

    try:
        _with_hooks(bench, {EARLY_LAYER: keep_and_stop})
    except _Stop:
        pass
    return kept[0]


def full3(bench: Bench) -> torch.Tensor:
    kept: list[torch.Tensor] = []
    _with_hooks(bench, {EARLY_LAYER: lambda _m, _a, out: kept.append(out)})
    return kept[0]


def make_hooks(bench: Bench) -> dict[str, Scenario]:
    return {
        "save1": lambda: save1(bench),
        "save1_second_site": lambda: save1_second_site(bench),
        "save1_out": lambda: save1_out(bench),
        "save_all": lambda: save_all(bench),
        "get_set_save": lambda: get_set_save(bench),
        "early3": lambda: early3(bench),
        "full3": lambda: full3(bench),
    }


def make_plain(bench: Bench) -> dict[str, Scenario]:
    return {"null": bench.forward}


def main() -> None:
    args = parse_args(frameworks=("plain", "hooks"))
    make = make_plain if args.framework == "plain" else make_hooks
    run_worker(args.framework, torch.__version__, args, make)


if __name__ == "__main__":
    main()
