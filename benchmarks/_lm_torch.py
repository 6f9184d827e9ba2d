"""Language-model worker for the references that need no tracing library (``language.py``).

- ``plain``: ``null`` times a plain forward against the pristine copy's plain forward, and
  ``generate_null`` a plain steered generation against the same: their "overhead" should be ~0,
  anything else is the method's own bias and this machine's noise. Their baseline medians are the
  plain numbers every other row is compared with.
- ``hooks``: what a careful user writes by hand, per call (register, run, remove):
  ``save_all`` keeps every decoder layer's output with 30 forward hooks; ``early3`` keeps
  ``model.layers[3]``'s output and ends the forward by raising from that hook (the manual floor of
  an early stop).

Each framework's scenarios run on a second copy of the model, loaded like the pristine one.
Runs in ``/work/main/.venv``; prints one JSON line.
"""

from __future__ import annotations

from typing import Any

import torch

from _lm import EARLY_LAYER, N_LAYERS, LMBench, Scenario, build, parse_args, run_lm_worker


class _Stop(BaseException):
    """Raised by a hook to end the forward (BaseException: model code may catch Exception)."""


def _forward_with(model: Any, ids: dict, hooks: dict[int, Any]) -> Any:
    layers = model.model.layers
    handles = [layers[i].register_forward_hook(fn) for i, fn in hooks.items()]
    try:
        return model(**ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def save_all(model: Any, ids: dict) -> list[torch.Tensor]:
    kept: dict[int, torch.Tensor] = {}
    hooks = {i: (lambda _m, _a, out, i=i: kept.__setitem__(i, out)) for i in range(N_LAYERS)}
    _forward_with(model, ids, hooks)
    return [kept[i] for i in range(N_LAYERS)]


def early3(model: Any, ids: dict) -> torch.Tensor:
    kept: list[torch.Tensor] = []

    def keep_and_stop(_m: Any, _a: Any, out: torch.Tensor) -> None:
        kept.append(out)
        raise _Stop

    try:
        _forward_with(model, ids, {EARLY_LAYER: keep_and_stop})
    except _Stop:
        pass
    return kept[0]


def make_plain(bench: LMBench) -> dict[str, Scenario]:
    other = build()  # an identical copy, so the pairs compare two models like every other row
    return {"null": other.forward, "generate_null": other.generate}


def make_hooks(bench: LMBench) -> dict[str, Scenario]:
    other = build()
    return {
        "save_all": lambda: save_all(other.model, other.ids),
        "early3": lambda: early3(other.model, other.ids),
    }


def main() -> None:
    args = parse_args(frameworks=("plain", "hooks"))
    make = make_plain if args.framework == "plain" else make_hooks
    run_lm_worker(args.framework, torch.__version__, args, make)


if __name__ == "__main__":
    main()
