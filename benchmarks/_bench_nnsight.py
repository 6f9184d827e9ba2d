"""Overhead worker for nnsight 0.8.1 (the comparison point for nnglass).

Runs only in ``.bench/nnsight-venv`` (built by ``benchmarks/setup_nnsight.sh``), in a process of
its own: importing nnsight mounts ``.save`` on ``object`` (anyio classes defined afterwards fail
their attribute checks) and patches torch globally (e.g. ``Tensor.backward``), which would
perturb any other framework timed in the same process.

The scenarios do exactly what ``_bench_nnglass.py``'s do. nnsight 0.8.1 specifics they rely on:

- a trace's body is not run inline: nnsight reads the file's source, parses the ``with`` block and
  compiles its body once per call site (memoised), then runs it interleaved with the forward pass.
  So each scenario is a real ``with`` block in this file, and ``save1_second_site`` repeats
  ``save1`` at a second site for the "first trace at a new call site" measurement;
- ``x.save()`` returns the value itself: after the block the name holds the tensor (no
  ``.value``);
- only values marked with ``save`` leave the block: a list of saved tensors built inside it is
  dropped unless the list itself is saved too (``outs.save()``);
- a body of only ``pass`` takes a fast path (no skip hook; the model still runs); measured, it
  is within a few µs of a one-statement body, so ``empty`` stands for both;
- gradients are read inside ``with loss.backward(...):``, a nested trace that runs the real
  backward and serves ``h.grad`` as autograd reaches ``h``. ``grad`` passes ``inputs=[h]``
  (autograd then computes only what ``h``'s gradient needs, as nnglass and the
  ``torch.autograd.grad`` baseline do); ``grad_full`` is the documented form without it, which
  also computes and accumulates every parameter's ``.grad`` (its check says so);
- there is no automatic early stop: ``early3`` calls ``tracer.stop()`` after saving
  ``layers[3].output``; ``full3`` (its baseline) reads that site and the model output;
- ``NNsight(module)`` mutates the module it wraps: every submodule gets an instance ``forward``
  wrapper, so even untraced calls get slower (scenario ``wrapped_forward``).
"""

from __future__ import annotations

from typing import Any

import nnsight
import torch
from nnsight import NNsight

from _harness import EARLY_LAYER, GET_SET_LAYER, Scenario, main_tensor, parse_args, run_worker
from _models import Bench


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
    return h


def save1_second_site(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output.save()
    return h


def save1_out(net: Any, b: Bench) -> list[torch.Tensor]:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output.save()
        y = net.output.save()
    return [h, main_tensor(y)]


def save_all(net: Any, b: Bench) -> list[torch.Tensor]:
    with net.trace(*b.args, **b.kwargs):
        layers = _layers(net, b.layer_path)
        outs = [layers[i].output.save() for i in range(b.n_layers)]
        outs.save()  # nnsight 0.8.1: the list must be saved too, or it does not leave the block
    return outs


def get_set_save(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        layers = _layers(net, b.layer_path)
        h = layers[GET_SET_LAYER].output
        layers[GET_SET_LAYER].output = h * 2
        o = layers[GET_SET_LAYER + 1].output.save()
    return o


def grad(net: Any, b: Bench) -> torch.Tensor:
    with torch.enable_grad(), net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output
        out = net.output.logits if b.name == "gpt2" else net.output
        with out.sum().backward(inputs=[h]):
            g = h.grad.save()
    return g


def grad_full(net: Any, b: Bench) -> torch.Tensor:
    with torch.enable_grad(), net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[b.save1_layer].output
        out = net.output.logits if b.name == "gpt2" else net.output
        with out.sum().backward():
            g = h.grad.save()
    return g


def early3(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs) as tracer:
        h = _layers(net, b.layer_path)[EARLY_LAYER].output.save()
        tracer.stop()
    return h


def full3(net: Any, b: Bench) -> torch.Tensor:
    with net.trace(*b.args, **b.kwargs):
        h = _layers(net, b.layer_path)[EARLY_LAYER].output.save()
        net.output.save()
    return h


def make(bench: Bench) -> dict[str, Scenario]:
    net = NNsight(bench.module)
    return {
        "empty": lambda: empty(net, bench),
        "save1": lambda: save1(net, bench),
        "save1_second_site": lambda: save1_second_site(net, bench),
        "save1_out": lambda: save1_out(net, bench),
        "save_all": lambda: save_all(net, bench),
        "get_set_save": lambda: get_set_save(net, bench),
        "grad": lambda: grad(net, bench),
        "grad_full": lambda: grad_full(net, bench),
        "early3": lambda: early3(net, bench),
        "full3": lambda: full3(net, bench),
        "wrapped_forward": bench.forward,  # untraced call of the module NNsight has wrapped
    }


if __name__ == "__main__":
    run_worker("nnsight", nnsight.__version__, parse_args(), make)
