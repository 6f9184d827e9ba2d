"""Residual-stream and neuron experiments as nnsight 0.8 users write them: per-position
loops, difference-of-means steering in a session, causal tracing (noise, then restore),
token-embedding ablation, top-k neurons, mean ablation across a batch, a cache as a dict,
per-prompt log-probabilities. On tiny GPT-2 and tiny Llama here (SmolLM2:
test_porting_smol.py), each against plain PyTorch hooks and after a JSON round trip.
"""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import torch

import nnglass

PROMPT = "The truth is"
PAIR = ["Paris is nice", "Rome is old too"]


def layers(tiny: Any, x: Any) -> Any:
    return x.transformer.h if tiny.arch == "gpt2" else x.model.layers


def embed(tiny: Any, x: Any) -> Any:
    return x.transformer.wte if tiny.arch == "gpt2" else x.model.embed_tokens


def down(tiny: Any, layer: Any) -> Any:
    """The MLP's output projection: its input is the neurons' activations."""
    return layer.mlp.c_proj if tiny.arch == "gpt2" else layer.mlp.down_proj


def untuple(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def outputs(tiny: Any, modules: list[Any], ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[Any], Any]:
    """Each module's first output in one plain forward (cloned), and the logits."""
    seen: dict[int, Any] = {}
    keep = lambda i: lambda m, a, out: seen.setdefault(i, lmf.clone_tree(out))
    with lmf.hooks(*(m.register_forward_hook(keep(i)) for i, m in enumerate(modules))):
        logits = lmf.forward(tiny.hf, ids, mask)
    return [seen[i] for i in range(len(modules))], logits


def test_norm_at_every_position_by_a_loop_over_the_shape(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            h = untuple(layers(tiny, lm)[1].output)
            norms = nnglass.save([h[0, t].norm() for t in range(h.shape[1])])
        return norms

    got = both(pair, experiment)
    (out,), _ = outputs(tiny, [layers(tiny, tiny.hf)[1]], ids, mask)
    h = untuple(out)
    assert torch.equal(torch.stack(got), torch.stack([h[0, t].norm() for t in range(h.shape[1])]))


def test_difference_of_means_steering_in_a_session(tiny: Any, pair: Any, both: Any) -> None:
    pos, neg, target = ["I love it", "Great fun"], ["I hate it", "Awful day"], "The movie was"

    def experiment(lm: Any) -> Any:
        with lm.session():
            with lm.trace() as tracer:
                with tracer.invoke(pos):
                    a = untuple(layers(tiny, lm)[0].output)[:, -1].mean(0)
                with tracer.invoke(neg):
                    b = untuple(layers(tiny, lm)[0].output)[:, -1].mean(0)
            with lm.trace(target):
                h = untuple(layers(tiny, lm)[0].output)
                h[:, -1] += 4 * (a - b)
                logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)
    ids, mask = lmf.padded(tiny.tokenizer, pos + neg)  # one batch, as the invokes are
    (out,), _ = outputs(tiny, [layers(tiny, tiny.hf)[0]], ids, mask)
    last = untuple(out)[:, -1]
    vec = 4 * (last[:2].mean(0) - last[2:].mean(0))

    def steer(out: Any) -> Any:
        untuple(out)[:, -1] += vec
        return out

    t_ids, t_mask = lmf.padded(tiny.tokenizer, target)
    lmf.assert_close(got, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[0], steer, t_ids, t_mask))


def test_causal_tracing_noise_then_restore_one_layer(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    width = int(ids.shape[1])
    gen = torch.Generator().manual_seed(1)
    noise = 0.5 * torch.randn(1, width, tiny.hf.config.hidden_size, generator=gen)

    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT):
                clean = untuple(layers(tiny, lm)[1].output)[:, 2]
            with tracer.invoke(PROMPT):
                embed(tiny, lm).output += noise
                untuple(layers(tiny, lm)[1].output)[:, 2] = clean
                logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)
    (out,), _ = outputs(tiny, [layers(tiny, tiny.hf)[1]], ids, mask)
    clean = untuple(out)[:, 2]

    def add_noise(e: torch.Tensor) -> torch.Tensor:
        return e + noise

    def restore(out: Any) -> Any:
        untuple(out)[:, 2] = clean
        return out

    noisy = embed(tiny, tiny.hf).register_forward_hook(lmf.output_editor(add_noise))
    restored = layers(tiny, tiny.hf)[1].register_forward_hook(lmf.output_editor(restore))
    with lmf.hooks(noisy, restored):
        ref = lmf.forward(tiny.hf, ids, mask)
    lmf.assert_close(got, ref)


def test_zero_one_token_embedding(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            e = embed(tiny, lm).output
            assert e.ndim == 3
            e[:, 1] = 0
            logits = lm.output.logits.save()
        return logits

    def zero(e: torch.Tensor) -> torch.Tensor:
        e[:, 1] = 0
        return e

    got = both(pair, experiment)
    assert torch.equal(got, lmf.edited_forward(tiny.hf, embed(tiny, tiny.hf), zero, ids, mask))


def test_top_k_neurons_by_unpacking_topk(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            acts = down(tiny, layers(tiny, lm)[0]).input[0, -1]
            values, indices = torch.topk(acts, k=min(5, acts.shape[-1]))
            values, indices = values.save(), indices.save()
        return values, indices

    values, indices = both(pair, experiment)
    seen: list[torch.Tensor] = []
    proj = down(tiny, layers(tiny, tiny.hf)[0])
    with lmf.hooks(proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))):
        lmf.forward(tiny.hf, ids, mask)
    ref = torch.topk(seen[0][0, -1], k=5)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


def test_mean_ablation_of_an_mlp_across_a_batch(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PAIR)

    def experiment(lm: Any) -> Any:
        with lm.trace(PAIR):
            mlp = layers(tiny, lm)[1].mlp
            mlp.output = mlp.output.mean(dim=0, keepdim=True).expand(mlp.output.shape[0], -1, -1)
            logits = lm.output.logits.save()
        return logits

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0, keepdim=True).expand(x.shape[0], -1, -1)

    got = both(pair, experiment)
    assert torch.equal(got, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[1].mlp, mean, ids, mask))


def test_a_cache_as_a_dict_of_every_layer(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            stack = layers(tiny, lm)
            cache = nnglass.save({f"layer{i}": untuple(layer.output) for i, layer in enumerate(stack)})
        return cache

    got = both(pair, experiment)
    seen, _ = outputs(tiny, list(layers(tiny, tiny.hf)), ids, mask)
    assert list(got) == [f"layer{i}" for i in range(len(seen))]
    for i, out in enumerate(seen):
        assert torch.equal(got[f"layer{i}"], untuple(out))


def test_log_probability_of_each_prompts_next_token(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PAIR)
    wanted = torch.tensor([[3], [4]])

    def experiment(lm: Any) -> Any:
        with lm.trace(PAIR):
            logp = lm.output.logits[:, -1].log_softmax(-1)
            picked = logp.gather(-1, wanted).squeeze(-1).save()
            best = logp.argmax(-1).save()
        return picked, best

    picked, best = both(pair, experiment)
    logp = lmf.forward(tiny.hf, ids, mask)[:, -1].log_softmax(-1)
    assert torch.equal(picked, logp.gather(-1, wanted).squeeze(-1))
    assert torch.equal(best, logp.argmax(-1))


EXPERIMENTS = [
    test_norm_at_every_position_by_a_loop_over_the_shape,
    test_difference_of_means_steering_in_a_session,
    test_causal_tracing_noise_then_restore_one_layer,
    test_zero_one_token_embedding,
    test_top_k_neurons_by_unpacking_topk,
    test_mean_ablation_of_an_mlp_across_a_batch,
    test_a_cache_as_a_dict_of_every_layer,
    test_log_probability_of_each_prompts_next_token,
]
