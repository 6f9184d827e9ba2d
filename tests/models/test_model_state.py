"""Model state inside a graph is opaque: a KV cache (or any object that is not a value)
can be carried and handed back to the model, never taken apart or saved, whatever the
key it came under. While weights are hidden (a server's policy), `.inputs` shows only
the value `.input` reads; every other argument (rotary tables, masks, caches) is opaque.

The keys a decoder layer receives are found with a plain hook, so the tests follow
whatever transformers passes (it renamed `past_key_values` to `cache` once already).
"""

from __future__ import annotations

import inspect
from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import ExecutionError, LanguageModel
from nnglass.runtime.backend import LocalBackend
from nnglass.runtime.limits import RunLimits

# Ways to take a value apart: each is one registry op applied to it (what a hostile
# client can send whatever its proxies allow).
ATTACKS = [
    ("builtins.list", ()), ("builtins.tuple", ()), ("builtins.dict", ()), ("builtins.len", ()),
    ("builtins.sum", ()), ("builtins.min", ()), ("operator.getitem", (0,)),
    ("operator.getitem", ("key_cache",)), ("builtins.getattr", ("shape",)), ("Tensor.size", ()),
    ("operator.contains", (0,)), ("torch.stack", ()),
]


def here(offset: int = 0) -> str:
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return f"{__file__}:{frame.f_back.f_lineno + offset}"


def layer_inputs(tiny: Any, generate: bool) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) the last decoder layer gets at its first call, by a plain hook."""
    seen: list[tuple[tuple, dict[str, Any]]] = []
    hook = _last_layer(tiny).register_forward_pre_hook(lambda m, a, kw: seen.append((a, dict(kw))),
                                                       with_kwargs=True)
    ids, mask = lmf.padded(tiny.tokenizer, "hello")
    with lmf.hooks(hook), torch.no_grad():
        if generate:
            tiny.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                             pad_token_id=0)
        else:
            lmf.forward(tiny.hf, ids, mask)
    return seen[0]


def _last_layer(tiny: Any) -> torch.nn.Module:
    return tiny.hf.transformer.h[-1] if tiny.arch == "gpt2" else tiny.hf.model.layers[-1]


def last_layer(tiny: Any, lm: Any) -> Any:
    return lm.transformer.h[1] if tiny.arch == "gpt2" else lm.model.layers[1]


def state_places(inputs: tuple[tuple, dict[str, Any]]) -> list[tuple[int, Any]]:
    """Where the inputs hold objects that are not values (anything but tensors, numbers,
    None and tuples): (0, position) in args, (1, key) in kwargs."""
    plain = (torch.Tensor, int, float, bool, type(None), tuple)
    args, kwargs = inputs
    return [(0, i) for i, v in enumerate(args) if not isinstance(v, plain)] + sorted(
        (1, k) for k, v in kwargs.items() if not isinstance(v, plain))


@pytest.mark.parametrize(("op", "extra"), ATTACKS)
def test_a_kv_cache_cannot_be_taken_apart(tiny: Any, pair: Any, op: str, extra: tuple) -> None:
    places = state_places(layer_inputs(tiny, generate=True))
    assert places, "the layer got no cache object: the test would prove nothing"
    for lm in (pair.local, pair.roundtrip):
        for part, key in places:
            with pytest.raises(ExecutionError, match="model state") as info:
                with lm.generate("hello", max_new_tokens=2) as tracer:
                    inputs = last_layer(tiny, lm).inputs
                    where = here(1)
                    tracer.record(op, (inputs[part][key], *extra)).save()
            assert info.value.where == where


def test_a_kv_cache_cannot_be_saved_wherever_it_sits(tiny: Any, pair: Any) -> None:
    for part, key in state_places(layer_inputs(tiny, generate=True)):
        with pytest.raises(ExecutionError, match="cache"):
            with pair.local.generate("hello", max_new_tokens=2):
                last_layer(tiny, pair.local).inputs[part][key].save()
        with pytest.raises(ExecutionError, match="cache"):
            with pair.local.generate("hello", max_new_tokens=2):
                last_layer(tiny, pair.local).inputs[part].save()  # the args or kwargs holding it


def test_opaque_state_goes_back_to_the_model_unchanged(tiny: Any, pair: Any, both: Any) -> None:
    """Setting `.inputs` from what a getter returned hands the model its own cache back:
    generation equals a plain pre-hook that doubles the layer's input."""

    n = len(layer_inputs(tiny, generate=True)[0])  # positional arguments (GPT-2 passes the cache so)

    def doubled(lm: Any) -> Any:
        with lm.generate("hello", max_new_tokens=3) as tracer:
            with tracer.all():
                layer = last_layer(tiny, lm)
                args, kwargs = layer.inputs
                layer.inputs = ((args[0] * 2, *[args[i] for i in range(1, n)]), kwargs)
            out = tracer.result.save()
        return out

    got = both(pair, doubled)
    ids, mask = lmf.padded(tiny.tokenizer, "hello")

    def pre(module: Any, args: tuple, kwargs: dict) -> Any:
        return (args[0] * 2, *args[1:]), kwargs

    layer = _last_layer(tiny)
    with lmf.hooks(layer.register_forward_pre_hook(pre, with_kwargs=True)), torch.no_grad():
        want = tiny.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(got, want)


def test_hidden_weights_show_only_the_input(tiny: Any, pair: Any) -> None:
    """With weights hidden, `.inputs` is `.input` plus opaque arguments: reading any other
    argument (the rotary tables, the mask, the positions) fails; `.input` equals a plain
    hook's. With weights visible the same arguments are plain values."""
    args, kwargs = layer_inputs(tiny, generate=False)
    places = [(0, i) for i, v in enumerate(args[1:], 1) if isinstance(v, (torch.Tensor, tuple))] + [
        (1, k) for k, v in sorted(kwargs.items()) if isinstance(v, (torch.Tensor, tuple))]
    assert places, "the layer got no other tensors: the test would prove nothing"
    # remote=True runs here, on pair.local, as a server hiding the weights runs it
    hidden = LocalBackend(pair.local, limits=RunLimits(hide_weights=True))
    lm = LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name=pair.local.name, backend=hidden)
    with lm.trace("hello", remote=True):
        first = last_layer(tiny, lm).inputs[0][0].save()
    for part, key in places:
        with pytest.raises(ExecutionError, match="keeps opaque while the model's weights are hidden"):
            with lm.trace("hello", remote=True):
                last_layer(tiny, lm).inputs[part][key][0].sum().save()
    lm = pair.local
    assert torch.equal(first.value, args[0])
    with lm.trace("hello"):
        inputs = last_layer(tiny, lm).inputs
        saved = [inputs[part][key].save() for part, key in places]
    for (part, key), value in zip(places, saved):
        assert torch.equal(_first(value.value), _first((args, kwargs)[part][key]))


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def test_unwrap_gives_back_what_graph_view_wrapped_in_any_container() -> None:
    """A ModelOutput or namedtuple holding state comes back with its class and the model's
    own objects (what a setter hands the model)."""
    from collections import namedtuple

    from transformers.modeling_outputs import CausalLMOutputWithPast

    from nnglass.graph.ir import find
    from nnglass.runtime.values import Opaque, graph_view, unwrap

    state, logits = object(), torch.zeros(1, 2)
    Pair = namedtuple("Pair", "h state")
    for value in (CausalLMOutputWithPast(logits=logits, past_key_values=state), Pair(logits, state),
                  (logits, [state]), {"h": logits, "s": state}):
        seen = graph_view(value)
        assert type(seen) is type(value) and seen is not value
        back = unwrap(seen)
        assert type(back) is type(value)
        leaves = list(back.values()) if isinstance(back, dict) else list(back)
        assert any(leaf is state or leaf == [state] for leaf in leaves if not isinstance(leaf, torch.Tensor))
        assert find(seen, Opaque) is not None and find(back, Opaque) is None
