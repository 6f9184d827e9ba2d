"""Overhead worker for nnglass, written against the public API of docs/reference.md.

Runs in ``/work/main/.venv`` in a process of its own (never next to nnsight, which patches torch
and ``object`` on import). Each scenario does exactly what its twin in ``_bench_nnsight.py`` does:

- ``empty``: a trace that touches nothing;
- ``save1``: save the middle block's output (nnglass may stop the forward pass early after it,
  docs/reference.md, so on the GPT-2 model its number can include that saving);
- ``save1_out``: ``save1`` plus the model's output, so every framework runs the whole forward
  pass: on GPT-2 the one row that is pure overhead for nnglass;
- ``save_all``: save every block's output;
- ``get_set_save``: ``h = layers[5].output; layers[5].output = h * 2``; save ``layers[6].output``;
- ``grad``: the gradient of ``output.sum()`` w.r.t. the middle block's output
  (``g = h.grad.save()`` declared before ``.backward()``, docs/reference.md); nnglass computes only the
  gradients the graph asks for, like the ``torch.autograd.grad`` baseline it is paired with;
- ``early3``: read ``layers[3].output`` (the forward stops after block 3 by itself); ``full3``
  reads it and the model output (the whole forward runs): early3's baseline;
- ``wrapped_forward``: an untraced call of the wrapped module (should cost nothing: nnglass
  installs hooks only for a trace and removes them after, docs/reference.md).

``.save()`` returns a proxy; its ``.value`` is the tensor after the block. For the GPT-2 model
the HF model is wrapped with ``NNModel`` and called with ``input_ids=`` (and ``use_cache=False``),
blocks at ``transformer.h[i]``.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

import nnglass
from _harness import EARLY_LAYER, GET_SET_LAYER, Scenario, main_tensor, parse_args, run_worker
from _models import Bench
from nnglass import NNModel


def _layers(net: Any, path: str) -> Any:
    for part in path.split("."):
        net = getattr(net, part)
    return net


def empty(net: Any, b: Bench) -> None:
    with net.trace(*b.args, **b.kwargs):
        pass


def save1(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output.save()
    return h.value


def save1_second_site(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output.save()
    return h.value


def save1_out(net: Any, b: Bench) -> list[torch.Tensor]:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output.save()
        y = net.output.save()
    return [h.value, main_tensor(y.value)]


def save_all(net: Any, b: Bench) -> list[torch.Tensor]:
    with net.trace(*b.args, **b.kwargs):
        layers = _layers(net, b.layer_path)
        outs = [layers[i].output.save() for i in range(b.n_layers)]
    return [o.value for o in outs]


def get_set_save(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        layers = _layers(net, b.layer_path)
        h = layers[GET_SET_LAYER].output
        layers[GET_SET_LAYER].output = h * 2
        o = layers[GET_SET_LAYER + 1].output.save()
    return o.value


def grad(net: Any, b: Bench) -> torch.Tensor:
    with torch.enable_grad(), net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output
        g = h.grad.save()
        out = net.output.logits if b.name == "gpt2" else net.output
        out.sum().backward()
    return g.value


def early3(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[EARLY_LAYER].output.save()
    return h.value


def full3(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[EARLY_LAYER].output.save()
        net.output.save()
    return h.value


def make(bench: Bench) -> dict[str, Scenario]:
    net = NNModel(bench.module)
    return {
        "empty": lambda: empty(net, bench),
        "save1": lambda: save1(net, bench),
        "save1_second_site": lambda: save1_second_site(net, bench),
        "save1_out": lambda: save1_out(net, bench),
        "save_all": lambda: save_all(net, bench),
        "get_set_save": lambda: get_set_save(net, bench),
        "grad": lambda: grad(net, bench),
        "early3": lambda: early3(net, bench),
        "full3": lambda: full3(net, bench),
        "wrapped_forward": bench.forward,  # untraced call of the module NNModel wraps
    }


def _version() -> str:
    version = getattr(nnglass, "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("nnglass")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    run_worker("nnglass", _version(), parse_args(), make)
