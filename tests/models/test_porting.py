"""nnsight code runs unchanged: experiments written the way nnsight 0.8 users write them
(`isinstance` to untuple, shapes in Python control flow, real tensors' methods taking
proxies, `nnglass.save`, `tracer.stop`, `tracer.iter`), on tiny GPT-2 and tiny Llama (and
on SmolLM2: tests/models/test_porting_smol.py runs these same functions).

Each runs locally and after a JSON round trip (`both`: bitwise equal) and is checked
against the same experiment done with plain PyTorch hooks (bitwise where the
computation is identical, allclose for gradients).
"""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

import nnglass

PROMPT = "The truth is"


def layers(tiny: Any, x: Any) -> Any:
    return x.transformer.h if tiny.arch == "gpt2" else x.model.layers


def final_norm(tiny: Any, x: Any) -> Any:
    return x.transformer.ln_f if tiny.arch == "gpt2" else x.model.norm


def attention(tiny: Any, layer: Any) -> Any:
    return layer.attn if tiny.arch == "gpt2" else layer.self_attn


def hidden(tiny: Any) -> int:
    return int(tiny.hf.config.hidden_size)


def steer_vector(tiny: Any, seed: int = 7) -> torch.Tensor:
    return 2 * torch.randn(hidden(tiny), generator=torch.Generator().manual_seed(seed))


def untuple(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def retuple(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


# --- steering -----------------------------------------------------------------------------


def test_steering_in_place_after_untupling(tiny: Any, pair: Any, both: Any) -> None:
    vec, alpha = steer_vector(tiny), 0.5
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            out = layers(tiny, lm)[1].output
            h = out[0] if isinstance(out, tuple) else out
            assert h.shape[-1] == hidden(tiny) and h.ndim == 3
            h[:, -1] += alpha * vec.to(device=h.device, dtype=h.dtype)
            logits = lm.output.logits.save()
        return logits

    def edit(out: Any) -> Any:
        h = untuple(out)
        h[:, -1] += alpha * vec
        return out

    got = both(pair, experiment)
    assert torch.equal(got, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[1], edit, ids, mask))


def test_steering_by_replacement_with_mixed_arithmetic(tiny: Any, pair: Any, both: Any) -> None:
    vec = steer_vector(tiny)
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            layer = layers(tiny, lm)[0]
            out = layer.output
            h = untuple(out)
            layer.output = retuple(out, 0.9 * h + vec * h.norm(dim=-1, keepdim=True) / h.shape[-1])
            logits = lm.output.logits.save()
        return logits

    def edit(out: Any) -> Any:
        h = untuple(out)
        return retuple(out, 0.9 * h + vec * h.norm(dim=-1, keepdim=True) / h.shape[-1])

    got = both(pair, experiment)
    assert torch.equal(got, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[0], edit, ids, mask))


# --- ablation -------------------------------------------------------------------------------


def test_mlp_ablation_with_a_tensor_of_the_outputs_shape(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            mlp = layers(tiny, lm)[0].mlp
            mlp.output = torch.zeros(mlp.output.shape, dtype=mlp.output.dtype)
            logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)
    ref = lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[0].mlp, torch.zeros_like, ids, mask)
    assert torch.equal(got, ref)


def test_attention_ablation_by_unpacking_its_output(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            attn = attention(tiny, layers(tiny, lm)[1])
            assert isinstance(attn.output, tuple)
            out, *rest = attn.output
            attn.output = (out * 0, *rest)
            logits = lm.output.logits.save()
        return logits

    def edit(out: Any) -> Any:
        return (out[0] * 0, *out[1:])

    got = both(pair, experiment)
    ref = lmf.edited_forward(tiny.hf, attention(tiny, layers(tiny, tiny.hf)[1]), edit, ids, mask)
    assert torch.equal(got, ref)


# --- reading ----------------------------------------------------------------------------------


def test_logit_lens_over_every_layer(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            lens = []
            for layer in layers(tiny, lm):
                h = untuple(layer.output)
                lens.append(lm.lm_head(final_norm(tiny, lm)(h))[:, -1].softmax(-1))
            probs = nnglass.save(lens)
        return probs

    got = both(pair, experiment)
    seen: list[Any] = []
    keep = lambda m, a, out: seen.append(lmf.clone_tree(out))
    with lmf.hooks(*(layer.register_forward_hook(keep) for layer in layers(tiny, tiny.hf))):
        lmf.forward(tiny.hf, ids, mask)
    with torch.no_grad():
        ref = [tiny.hf.lm_head(final_norm(tiny, tiny.hf)(untuple(h)))[:, -1].softmax(-1) for h in seen]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_batched_prompts_rows_and_positions_by_shape(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi there", "a"]
    ids, mask = lmf.padded(tiny.tokenizer, texts)

    def experiment(lm: Any) -> Any:
        with lm.trace(texts):
            h = untuple(layers(tiny, lm)[0].output)
            batch, width, _ = h.shape
            assert (batch, width) == tuple(ids.shape)
            rows = [h[i, -1] for i in range(batch)]
            positions = [h[:, t].norm(dim=-1) for t in range(h.size(1))]
            saved = nnglass.save({"rows": rows, "positions": torch.stack(positions, 1)})
        return saved

    got = both(pair, experiment)
    h = untuple(lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[0], ids, mask)[0])
    assert all(torch.equal(got["rows"][i], h[i, -1]) for i in range(2))
    assert torch.equal(got["positions"], torch.stack([h[:, t].norm(dim=-1) for t in range(h.shape[1])], 1))


# --- patching -----------------------------------------------------------------------------------


def test_activation_patching_between_prompts(tiny: Any, pair: Any, both: Any) -> None:
    clean, corrupt = "Paris is in", "Rome is in!"
    assert len(clean) == len(corrupt)
    ids_c, mask_c = lmf.padded(tiny.tokenizer, clean)
    ids_x, mask_x = lmf.padded(tiny.tokenizer, corrupt)

    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(clean):
                h_clean = untuple(layers(tiny, lm)[1].output)
                assert h_clean.shape[0] == 1
                source = h_clean[:, -1]
            with tracer.invoke(corrupt):
                h = untuple(layers(tiny, lm)[1].output)
                h[:, -1] = source
                logits = lm.output.logits[:, -1].save()
        return logits

    got = both(pair, experiment)
    h = untuple(lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[1], ids_c, mask_c)[0])

    def edit(out: Any) -> Any:
        untuple(out)[:, -1] = h[:, -1]
        return out

    ref = lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[1], edit, ids_x, mask_x)[:, -1]
    lmf.assert_close(got, ref)  # batched with another prompt: float tolerance (docs/reference.md)


def test_attribution_patching_over_every_layer(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    a, b = 5, 9

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            acts, grads = [], []
            for layer in layers(tiny, lm):
                h = untuple(layer.output)
                acts.append(h.save())
                grads.append(h.grad.save())
            logits = lm.output.logits
            metric = logits[0, -1, a] - logits[0, -1, b]
            metric.backward()
        return acts, grads

    acts, grads = both(pair, experiment)
    seen: list[torch.Tensor] = []

    def keep(m: Any, args: Any, out: Any) -> None:
        h = untuple(out)
        h.retain_grad()
        seen.append(h)

    handles = [layer.register_forward_hook(keep) for layer in layers(tiny, tiny.hf)]
    with lmf.hooks(*handles), torch.enable_grad():
        logits = tiny.hf(input_ids=ids, attention_mask=mask, position_ids=lmf.positions(mask),
                         use_cache=False).logits
        ref = torch.autograd.grad(logits[0, -1, a] - logits[0, -1, b], seen)
    for got_a, got_g, h, g in zip(acts, grads, seen, ref):
        assert torch.equal(got_a, h.detach())
        lmf.assert_close(got_g, g, atol=1e-6, rtol=1e-5)


def test_gradient_of_a_site_whose_loss_is_computed_in_its_own_hook(tiny: Any, pair: Any, both: Any) -> None:
    """The defect: `.grad` of the last layer when the loss needs nothing later."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            h = untuple(layers(tiny, lm)[-1].output)
            g = h.grad.save()
            (h * h).sum().backward()
        return g

    got = both(pair, experiment)
    seen: list[torch.Tensor] = []
    handle = layers(tiny, tiny.hf)[-1].register_forward_hook(lambda m, a, out: seen.append(untuple(out)))
    with lmf.hooks(handle), torch.enable_grad():
        tiny.hf(input_ids=ids, attention_mask=mask, position_ids=lmf.positions(mask), use_cache=False)
        h = seen[0]
        ref = torch.autograd.grad((h * h).sum(), h)[0]
    assert torch.equal(got, ref)


# --- generation ------------------------------------------------------------------------------------


def test_steered_generation_with_shapes_per_step(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi there", "hello world"]  # more than one token each, for every tokenizer
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    vec = steer_vector(tiny)
    widths: list[Any] = []

    def experiment(lm: Any) -> Any:
        with lm.generate(texts, max_new_tokens=3) as tracer:
            with tracer.all():
                h = untuple(layers(tiny, lm)[0].output)
                assert h.size(-1) == hidden(tiny) and h.size(0) == 2
                h[:, -1] += vec.to(h.dtype)
            with tracer.step(0):
                widths.append(untuple(layers(tiny, lm)[0].output).shape[1])
            with tracer.iter[1]:
                widths.append(untuple(layers(tiny, lm)[0].output).shape[1])
            with pytest.raises(nnglass.TraceError, match="differs between generation steps"):
                with tracer.iter[:]:
                    untuple(layers(tiny, lm)[0].output).shape  # noqa: B018
            result = tracer.result.save()
        return result

    def edit(out: Any) -> Any:
        untuple(out)[:, -1] += vec
        return out

    got = both(pair, experiment)
    assert widths == [ids.shape[1], 1] * 2
    ref = lmf.generate(tiny.hf, ids, mask, 3, hook=(layers(tiny, tiny.hf)[0], lmf.output_editor(edit)))
    assert torch.equal(got, ref)


def test_tracer_iter_range_loops_over_steps(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.generate(PROMPT, max_new_tokens=3) as tracer:
            picks = [lm.lm_head.output[:, -1].argmax(-1).save() for _ in tracer.iter[0:3]]
            with tracer.iter[:]:
                every = lm.lm_head.output[:, -1].argmax(-1).save()
            result = tracer.result.save()
        return picks, every, result

    picks, every, result = both(pair, experiment)
    ref = lmf.generate(tiny.hf, ids, mask, 3)
    assert torch.equal(result, ref)
    new = ref[:, ids.shape[1]:]
    assert [int(p) for p in picks] == new[0].tolist() == [int(e) for e in every]


def test_tracer_stop_after_an_early_layer(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT) as tracer:
            h = nnglass.save(untuple(layers(tiny, lm)[0].output))
            tracer.stop()
        return h

    got = both(pair, experiment)
    assert torch.equal(got, untuple(lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[0], ids, mask)[0]))


def test_metadata_inside_a_session(tiny: Any, pair: Any, both: Any) -> None:
    clean, other = "Paris is", "Rome is!"
    ids, mask = lmf.padded(tiny.tokenizer, other)
    ids_c, mask_c = lmf.padded(tiny.tokenizer, clean)

    def experiment(lm: Any) -> Any:
        with lm.session():
            with lm.trace(clean):
                h = untuple(layers(tiny, lm)[0].output)[:, -1]
            with lm.trace(other):
                assert h.shape == (1, hidden(tiny)) and isinstance(h, torch.Tensor)
                target = untuple(layers(tiny, lm)[0].output)
                target[:, -1] = h
                logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)
    h = untuple(lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[0], ids_c, mask_c)[0])

    def edit(out: Any) -> Any:
        untuple(out)[:, -1] = h[:, -1]
        return out

    assert torch.equal(got, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[0], edit, ids, mask))
