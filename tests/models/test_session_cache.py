"""Sessions (several traces as one unit) and tracer.cache, against plain PyTorch references,
locally and after a JSON round trip of the whole session graph."""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import TraceError


def _layers(lm: Any) -> Any:
    return lm.transformer.h if hasattr(lm.module, "transformer") else lm.model.layers


def test_session_values_flow_between_traces_without_save(tiny: Any, pair: Any, both: Any) -> None:
    """Patch the last position of layer 0 from one prompt into another of the same length."""

    def experiment(lm: Any) -> Any:
        with lm.session():
            with lm.trace("Paris is big"):
                source = _layers(lm)[0].output[:, -1]  # never saved
            with lm.trace("Rome is huge"):
                _layers(lm)[0].output[:, -1] = source
                out = lm.output.logits.save()
        return out

    patched = both(pair, experiment)
    # The same patch as two plain forward hooks.
    ids_a, mask_a = lmf.padded(tiny.tokenizer, "Paris is big")
    ids_b, mask_b = lmf.padded(tiny.tokenizer, "Rome is huge")
    seen, _ = lmf.hook_view(tiny.hf, tiny.layer0(tiny.hf), ids_a, mask_a)

    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, -1] = seen[:, -1]
        return out

    ref = lmf.edited_forward(tiny.hf, tiny.layer0(tiny.hf), edit, ids_b, mask_b)
    assert torch.equal(patched, ref)


def test_only_saved_values_come_back_and_value_waits_for_the_session(tiny: Any, pair: Any) -> None:
    lm = pair.local
    with lm.session():
        with lm.trace("hello"):
            kept = _layers(lm)[0].output.save()
            dropped = _layers(lm)[1].output
        with pytest.raises(TraceError, match="only available after"):
            kept.value  # noqa: B018 - the access is the test
    assert kept.shape[0] == 1
    with pytest.raises(TraceError):
        dropped.value  # noqa: B018


def test_a_value_from_outside_the_session_is_refused(tiny: Any, pair: Any) -> None:
    lm = pair.local
    with lm.trace("hello"):
        outside = _layers(lm)[0].output
    with pytest.raises(TraceError, match="session"), lm.session(), lm.trace("hello"):
        _layers(lm)[0].output = outside


def test_cache_saves_matching_modules_only(tiny: Any, pair: Any, both: Any) -> None:
    pattern = "transformer.h.*" if tiny.arch == "gpt2" else "model.layers.*"

    def experiment(lm: Any) -> Any:
        with lm.trace("hello world") as tracer:
            cache = tracer.cache(modules=[pattern], inputs=True)
        return {k: (v.output.value, v.inputs.value) for k, v in cache.items()}

    cached = both(pair, experiment)
    prefix = pattern[:-2]
    assert sorted(cached) == [f"{prefix}.0", f"{prefix}.1"]
    ids, mask = lmf.padded(tiny.tokenizer, "hello world")
    for i, layer in enumerate(tiny_layers(tiny)):
        seen, _ = lmf.hook_view(tiny.hf, layer, ids, mask)
        output, (args, _kwargs) = cached[f"{prefix}.{i}"]
        assert torch.equal(output if isinstance(output, torch.Tensor) else output[0],
                           seen if isinstance(seen, torch.Tensor) else seen[0])
        assert args[0].shape == (*ids.shape, tiny.hf.config.hidden_size)


def test_cache_in_generation_holds_a_list_per_step(tiny: Any, pair: Any) -> None:
    lm = pair.local
    pattern = "transformer.h.0" if tiny.arch == "gpt2" else "model.layers.0"
    with lm.generate("hi", max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[pattern])
    steps = cache[pattern].output.value
    assert len(steps) == 3
    first = steps[0] if isinstance(steps[0], torch.Tensor) else steps[0][0]
    later = steps[1] if isinstance(steps[1], torch.Tensor) else steps[1][0]
    assert first.shape[1] == 2 and later.shape[1] == 1


def test_cache_with_no_match_is_a_clear_error(tiny: Any, pair: Any) -> None:
    with pytest.raises(TraceError, match="no module matches"), pair.local.trace("hi") as tracer:
        tracer.cache(modules=["nothing.*"])


def tiny_layers(tiny: Any) -> Any:
    return tiny.hf.transformer.h if tiny.arch == "gpt2" else tiny.hf.model.layers
