"""nnsight's remaining verbs, written as nnsight 0.8 users write them, on tiny GPT-2 and
tiny Llama: `with loss.backward():` (gradients read inside the block), `rename=` aliases,
`model.edit()` / `clear_edits()`. Each runs locally and after a JSON round trip (`both`)
and is checked against plain PyTorch hooks.
"""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass.errors import TraceError

PROMPT = "The truth is"


def layers(tiny: Any, x: Any) -> Any:
    return x.transformer.h if tiny.arch == "gpt2" else x.model.layers


def untuple(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def reference_grads(tiny: Any, ids: torch.Tensor, mask: torch.Tensor, picks: list[int], loss: Any) -> Any:
    """The layers' outputs and the gradients of `loss(logits)` w.r.t. them, by plain hooks."""
    seen: dict[int, torch.Tensor] = {}
    stack = layers(tiny, tiny.hf)
    keep = lambda i: lambda m, a, out: seen.setdefault(i, untuple(out))
    handles = [stack[i].register_forward_hook(keep(i)) for i in picks]
    positions = lmf.positions(mask)
    with lmf.hooks(*handles), torch.enable_grad():
        logits = tiny.hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        grads = torch.autograd.grad(loss(logits), [seen[i] for i in picks])
    return [seen[i].detach() for i in picks], list(grads)


# --- with loss.backward(): ---------------------------------------------------------------------


def test_gradients_read_inside_a_backward_block(tiny: Any, pair: Any, both: Any) -> None:
    """nnsight 0.8: the loss first, then `with loss.backward():` and `.grad` inside it,
    also of a site read again inside the block."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    a, b = 3, 11

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            h0 = untuple(layers(tiny, lm)[0].output)
            logits = lm.output.logits
            metric = logits[0, -1, a] - logits[0, -1, b]
            with metric.backward():
                g0 = h0.grad.save()
                g1 = untuple(layers(tiny, lm)[1].output).grad.save()
        return g0, g1

    g0, g1 = both(pair, experiment)
    _, (r0, r1) = reference_grads(tiny, ids, mask, [0, 1], lambda lg: lg[0, -1, a] - lg[0, -1, b])
    lmf.assert_close(g0, r0, atol=1e-6, rtol=1e-5)
    lmf.assert_close(g1, r1, atol=1e-6, rtol=1e-5)


def test_a_gradient_edited_inside_a_backward_block(tiny: Any, pair: Any, both: Any) -> None:
    """Zeroing the gradient flowing into layer 1 inside the block: layer 0's gradient is then 0
    wherever it only came through layer 1 (here: everywhere, the residual stream included)."""

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            h0 = untuple(layers(tiny, lm)[0].output)
            h1 = untuple(layers(tiny, lm)[1].output)
            loss = lm.output.logits[0, -1].sum()
            with loss.backward():
                g0 = h0.grad.save()
                h1.grad = torch.zeros_like(h1)
        return g0

    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    h0, _ = lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[0], ids, mask)
    assert torch.equal(both(pair, experiment), torch.zeros_like(untuple(h0)))


def test_a_grad_after_a_plain_backward_still_says_declare_it_first(tiny: Any, pair: Any) -> None:
    with pytest.raises(TraceError, match="declare it before"):
        with pair.local.trace(PROMPT):
            h = untuple(layers(tiny, pair.local)[0].output)
            pair.local.output.logits.sum().backward()
            h.grad.save()


# --- model.edit() / clear_edits() ----------------------------------------------------------------


def halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def test_an_inplace_edit_applies_to_every_later_trace_until_cleared(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    mlp = layers(tiny, tiny.hf)[1].mlp

    def experiment(lm: Any) -> Any:
        with lm.edit(inplace=True):
            layers(tiny, lm)[1].mlp.output = layers(tiny, lm)[1].mlp.output * 0.5
        with lm.trace(PROMPT):
            edited = lm.output.logits.save()
        with lm.trace(PROMPT):  # a getter at the edited site sees the edit
            seen = layers(tiny, lm)[1].mlp.output.save()
        lm.clear_edits()
        with lm.trace(PROMPT):
            clean = lm.output.logits.save()
        return edited, seen, clean

    edited, seen, clean = both(pair, experiment)
    out, _ = lmf.hook_view(tiny.hf, mlp, ids, mask)
    assert torch.equal(edited, lmf.edited_forward(tiny.hf, mlp, halve, ids, mask))
    assert torch.equal(seen, out * 0.5)
    assert torch.equal(clean, lmf.forward(tiny.hf, ids, mask))


def test_edit_returns_an_edited_handle_and_leaves_the_model_alone(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    vec = torch.randn(tiny.hf.config.hidden_size, generator=torch.Generator().manual_seed(3))

    def experiment(lm: Any) -> Any:
        with lm.edit() as steered:
            layers(tiny, lm)[0].mlp.output[:, -1] += vec
        with steered.trace(PROMPT):
            a = steered.output.logits.save()
        with lm.trace(PROMPT):
            b = lm.output.logits.save()
        return a, b

    a, b = both(pair, experiment)

    def add(x: torch.Tensor) -> torch.Tensor:
        x[:, -1] += vec
        return x

    assert torch.equal(a, lmf.edited_forward(tiny.hf, layers(tiny, tiny.hf)[0].mlp, add, ids, mask))
    assert torch.equal(b, lmf.forward(tiny.hf, ids, mask))


def test_an_edit_applies_at_every_generation_step(tiny: Any, pair: Any, both: Any) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    mlp = layers(tiny, tiny.hf)[1].mlp

    def experiment(lm: Any) -> Any:
        with lm.edit() as edited:
            layers(tiny, lm)[1].mlp.output = layers(tiny, lm)[1].mlp.output * 0.5
        with edited.generate(PROMPT, max_new_tokens=4) as tracer:
            tokens = tracer.result.save()
        return tokens

    got = both(pair, experiment)
    ref = lmf.generate(tiny.hf, ids, mask, 4, hook=(mlp, lambda m, a, out: out * 0.5))
    assert torch.equal(got, ref)


def test_an_edit_saves_nothing(tiny: Any, pair: Any) -> None:
    lm = pair.local
    with pytest.raises(TraceError, match="an edit saves nothing"):
        with lm.edit(inplace=True):
            layers(tiny, lm)[0].output.save()
    assert lm._edits == ()


# --- rename= and module.skip(value) --------------------------------------------------------------


def test_rename_aliases_paths_and_names(tiny: Any) -> None:
    from nnglass import LanguageModel

    stack = "transformer.h" if tiny.arch == "gpt2" else "model.layers"
    attn = "attn" if tiny.arch == "gpt2" else "self_attn"
    lm = LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), rename={stack: "layers", attn: "attention"})
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    with lm.trace(PROMPT):
        h = lm.layers[1].output.save()
        a = lm.layers[0].attention.output.save()
        same = layers(tiny, lm)[1].output.save()  # the real names keep working
    sub = layers(tiny, tiny.hf)
    ref_h, _ = lmf.hook_view(tiny.hf, sub[1], ids, mask)
    ref_a, _ = lmf.hook_view(tiny.hf, getattr(sub[0], attn), ids, mask)
    assert torch.equal(h, ref_h) and torch.equal(same, ref_h)
    assert torch.equal(untuple(a.value), untuple(ref_a))
    with pytest.raises(TraceError, match=r"no module at `transformer\.nope`"):
        LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), rename={"transformer.nope": "x"})


def test_skip_a_layer_passing_its_input_through(tiny: Any, pair: Any, both: Any) -> None:
    """nnsight: `layer.skip(layer.input)` - the layer's output is its input."""
    ids, mask = lmf.padded(tiny.tokenizer, PROMPT)
    stack = layers(tiny, tiny.hf)

    def experiment(lm: Any) -> Any:
        with lm.trace(PROMPT):
            layer = layers(tiny, lm)[1]
            out = layer.output
            h = layer.input
            layer.skip((h, *out[1:]) if isinstance(out, tuple) else h)
            logits = lm.output.logits.save()
        return logits

    got = both(pair, experiment)

    def through(m: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with lmf.hooks(stack[1].register_forward_hook(through, with_kwargs=True)), torch.no_grad():
        ref = lmf.forward(tiny.hf, ids, mask)
    assert torch.equal(got, ref)


def test_tracer_iter_past_the_last_step_is_refused_while_recording(tiny: Any, pair: Any) -> None:
    lm = pair.local
    with pytest.raises(TraceError, match=r"has 2 steps \(0\.\.1\), step 3 never runs"):
        with lm.generate(PROMPT, max_new_tokens=2) as tracer:
            for _ in tracer.iter[0:4]:
                layers(tiny, lm)[0].output.save()


# --- shapes read before a later, longer prompt ---------------------------------------------------


def test_a_width_read_before_a_longer_prompt_is_an_error_not_a_stale_number(tiny: Any, pair: Any) -> None:
    lm = pair.local
    with pytest.raises(TraceError, match=r"the size of dim 1 read here \(2\) is 11 once every invoke"):
        with lm.trace() as tracer:
            with tracer.invoke("hi"):
                h = untuple(layers(tiny, lm)[0].output)
                width = h.shape  # [1, 2, H] now; [1, 11, H] once the second prompt pads it
                h[:, : width[1]].save()
            with tracer.invoke("hello world"):
                layers(tiny, lm)[0].output.save()


def test_what_a_longer_prompt_does_not_change_may_be_read_early(tiny: Any, pair: Any, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke("hi"):
                h = untuple(layers(tiny, lm)[0].output)
                assert h.size(-1) == tiny.hf.config.hidden_size and isinstance(h, torch.Tensor)
                a = h[:, -1].save()
            with tracer.invoke("hello world"):
                b = untuple(layers(tiny, lm)[0].output)[:, -1].save()
        return a, b

    a, b = both(pair, experiment)
    ids, mask = lmf.padded(tiny.tokenizer, ["hi", "hello world"])
    out, _ = lmf.hook_view(tiny.hf, layers(tiny, tiny.hf)[0], ids, mask)
    lmf.assert_close(a, untuple(out)[:1, -1])
    lmf.assert_close(b, untuple(out)[1:, -1])
