"""The user's experiments on the real SmolLM2-135M, each against plain PyTorch: the seed
experiment, logit lens, activation patching across invokes, steering during generation,
gradient attribution, and greedy generation.

One LanguageModel (weights loaded once) per module; each experiment also runs after a
JSON round trip of its graph (a second LanguageModel over the same weights) and must
give bitwise-equal saved values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import LanguageModel

TRUTH = "The truth is the"
EIFFEL = "The Eiffel Tower is in the city of"
COLOSSEUM = "The Colosseum is in the city of"  # as many tokens as EIFFEL


@pytest.fixture(scope="module")
def smol(nnglass_cache: Any) -> Iterator[lmf.Pair]:
    local = lmf.make_lm(lambda: LanguageModel("smollm2-135m"), roundtrip=False)
    hf = local.module
    roundtrip = lmf.make_lm(
        lambda: LanguageModel(hf, tokenizer=local.tokenizer, name="smollm2-135m"), roundtrip=True
    )
    yield lmf.Pair(local, roundtrip)


@pytest.fixture
def hf(smol: lmf.Pair) -> Iterator[torch.nn.Module]:
    """The transformers model both LanguageModels wrap; left as it was after each test."""
    model = smol.local.module
    before = lmf.fingerprint(model)
    yield model
    assert lmf.fingerprint(model) == before, "the model was not left as it was"


def encode(smol: lmf.Pair, prompt: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return lmf.padded(smol.local.tokenizer, prompt)


def top_token(smol: lmf.Pair, logits: torch.Tensor) -> str:
    return smol.local.tokenizer.decode(logits[0, -1].argmax())


def test_seed_experiment(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    def clean(lm: Any) -> Any:
        with lm.trace(TRUTH):
            logits = lm.output.logits.save()
        return logits

    def edited(lm: Any) -> Any:
        with lm.trace(TRUTH):
            lm.model.layers[16].mlp.down_proj.input[:, -1, [394, 1000, 1200]] = 10
            logits = lm.output.logits.save()
        return logits

    def edit(x: torch.Tensor) -> torch.Tensor:
        x[:, -1, [394, 1000, 1200]] = 10
        return x

    ids, mask = encode(smol, TRUTH)
    down_proj = hf.model.layers[16].mlp.down_proj
    with lmf.hooks(down_proj.register_forward_pre_hook(lmf.input_editor(edit))):
        ref = lmf.forward(hf, ids, mask)
    before, after = both(smol, clean), both(smol, edited)
    assert torch.equal(before, lmf.forward(hf, ids, mask))
    assert torch.equal(after, ref)
    assert top_token(smol, after) != top_token(smol, before)


def test_logit_lens(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.trace(EIFFEL):
            final = lm.lm_head(lm.model.norm(lm.model.layers[-1].output)).save()
            middle = lm.lm_head(lm.model.norm(lm.model.layers[10].output)).save()
            logits = lm.output.logits.save()
        return final, middle, logits

    final, middle, logits = both(smol, experiment)
    assert torch.equal(final, logits)
    ids, mask = encode(smol, EIFFEL)
    h10, _ = lmf.hook_view(hf, hf.model.layers[10], ids, mask)
    with torch.no_grad():
        assert torch.equal(middle, hf.lm_head(hf.model.norm(h10)))
    assert top_token(smol, final) == " Paris"


def test_activation_patching_across_invokes(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    assert encode(smol, EIFFEL)[0].shape == encode(smol, COLOSSEUM)[0].shape
    layer = 8

    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(EIFFEL):
                residual = lm.model.layers[layer].output
                source = lm.output.logits.save()
            with tracer.invoke(COLOSSEUM):
                lm.model.layers[layer].output = residual
                patched = lm.output.logits.save()
        return source, patched

    source, patched = both(smol, experiment)
    lmf.assert_close(patched, source)
    assert top_token(smol, patched) == " Paris"
    assert top_token(smol, lmf.forward(hf, *encode(smol, COLOSSEUM))) == " Rome"

    # The reference's example: the last position only, between prompts of different lengths.
    short = "The Colosseum is in"

    def last_position(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(EIFFEL):
                clean = lm.model.layers[layer].output[:, -1]
            with tracer.invoke(short):
                lm.model.layers[layer].output[:, -1] = clean
                patched = lm.output.logits[:, -1].save()
        return patched

    patched = both(smol, last_position)
    source_h, _ = lmf.hook_view(hf, hf.model.layers[layer], *encode(smol, EIFFEL))

    def put(out: torch.Tensor) -> torch.Tensor:
        out[:, -1] = source_h[:, -1]
        return out

    ref = lmf.edited_forward(hf, hf.model.layers[layer], put, *encode(smol, short))
    lmf.assert_close(patched, ref[:, -1])


def test_steering_during_generation(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    prompt, n = "Once upon a time", 6
    steer = 60 * torch.nn.functional.normalize(
        torch.randn(576, generator=torch.Generator().manual_seed(0)), dim=0
    )

    def experiment(lm: Any) -> Any:
        with lm.generate(prompt, max_new_tokens=n) as tracer:
            with tracer.all():
                lm.model.layers[12].output[:, -1] += steer
            tokens = tracer.result.save()
        return tokens

    def edit(out: torch.Tensor) -> torch.Tensor:
        out[:, -1] += steer
        return out

    ids, mask = encode(smol, prompt)
    steered = both(smol, experiment)
    ref = lmf.generate(hf, ids, mask, n, hook=(hf.model.layers[12], lmf.output_editor(edit)))
    assert torch.equal(steered, ref)
    assert not torch.equal(steered, lmf.generate(hf, ids, mask, n)), "the steer changed nothing"


def test_gradient_attribution(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.trace(TRUTH):
            h = lm.model.layers[10].output
            g = h.grad.save()
            lm.output.logits[0, -1].max().backward()
        return g

    grad = both(smol, experiment)
    ids, mask = encode(smol, TRUTH)
    seen: list[torch.Tensor] = []
    with lmf.hooks(hf.model.layers[10].register_forward_hook(lambda m, a, out: seen.append(out))):
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=lmf.positions(mask),
                    use_cache=False).logits
    (ref,) = torch.autograd.grad(logits[0, -1].max(), seen[0])
    assert grad.shape == (1, ids.shape[1], 576)
    lmf.assert_close(grad, ref, atol=1e-6, rtol=1e-5)
    assert grad.abs().sum() > 0


def test_greedy_generation_says_paris(smol: lmf.Pair, hf: torch.nn.Module, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.generate(EIFFEL, max_new_tokens=1) as tracer:
            tokens = tracer.result.save()
        return tokens

    tokens = both(smol, experiment)
    ids, mask = encode(smol, EIFFEL)
    assert torch.equal(tokens, lmf.generate(hf, ids, mask, 1))
    assert smol.local.tokenizer.decode(tokens[0, -1]) == " Paris"
