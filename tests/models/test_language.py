"""LanguageModel on tiny random GPT-2 (learned absolute positions) and Llama (rotary):
prompts and left-padded invokes, getters and setters against plain hooks, generation
steps against `model.generate`, seeded sampling, scans, and what cannot be saved.

Every experiment runs twice (`both`): as recorded, and after a JSON round trip of its
graph; the saved values must be bitwise equal.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lm_fixtures as lmf
import pytest
import torch

from nnglass import ExecutionError, LanguageModel, NNglassError, OutOfOrderError

PROMPTS = ["hi", "hello there", "abc"]  # three lengths: 2, 11, 3 tokens (one per char)
N = 4  # new tokens


def here() -> str:
    """file:line of the caller's current line (what an error must point at)."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return f"{__file__}:{frame.f_back.f_lineno}"


def logits_of(lm: Any, prompt: Any) -> Any:
    with lm.trace(prompt):
        logits = lm.output.logits.save()
    return logits


@contextmanager
def counting(module: torch.nn.Module) -> Iterator[list[int]]:
    """A list that gets one entry per forward call of `module` while the block runs."""
    calls: list[int] = []
    with lmf.hooks(module.register_forward_pre_hook(lambda m, a: calls.append(1))):
        yield calls


# --- prompts, padding, invokes ----------------------------------------------------------


def test_invokes_of_different_lengths_match_each_prompt_alone(tiny: Any, pair: Any, both: Any) -> None:
    def batched(lm: Any) -> Any:
        out = []
        with lm.trace() as tracer:
            for prompt in PROMPTS:
                with tracer.invoke(prompt):
                    out.append((lm.output.logits.save(), lm.lm_head.output[:, -1].save()))
        return out

    width = max(len(p) for p in PROMPTS)
    for prompt, (logits, last) in zip(PROMPTS, both(pair, batched)):
        ids, _ = lmf.padded(tiny.tokenizer, prompt)
        alone = lmf.forward(tiny.hf, ids)
        assert logits.shape == (1, width, lmf.VOCAB)  # [its rows, T_max, ...], left-padded
        lmf.assert_close(logits[:, -len(prompt) :], alone)
        lmf.assert_close(last, alone[:, -1])
        # The same prompt traced alone is a plain forward, bit for bit.
        assert torch.equal(both(pair, lambda lm, p=prompt: logits_of(lm, p)), alone)


def test_invoke_with_several_prompts_gets_its_rows(tiny: Any, pair: Any, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPTS[:2]):
                two = lm.output.logits[:, -1].save()
            with tracer.invoke(PROMPTS[2]):
                one = lm.output.logits[:, -1].save()
            with tracer.invoke():  # no input: the whole batch
                every = lm.output.logits[:, -1].save()
        return two, one, every

    two, one, every = both(pair, experiment)
    assert (two.shape, one.shape, every.shape) == ((2, lmf.VOCAB), (1, lmf.VOCAB), (3, lmf.VOCAB))
    assert torch.equal(every, torch.cat([two, one]))
    for i, prompt in enumerate(PROMPTS):
        ids, _ = lmf.padded(tiny.tokenizer, prompt)
        lmf.assert_close(every[i], lmf.forward(tiny.hf, ids)[0, -1])


def test_prompt_forms_give_identical_results(tiny: Any, pair: Any, both: Any) -> None:
    tok = tiny.tokenizer
    text = "hello there"
    ids = tok(text)["input_ids"]
    forms = [
        text, [text], ids, [ids], torch.tensor(ids), torch.tensor([ids]),
        tok(text, return_tensors="pt"), tok(text),
    ]
    results = [both(pair, lambda lm, f=f: logits_of(lm, f)) for f in forms]
    for form, result in zip(forms, results):
        assert torch.equal(result, results[0]), f"prompt given as {type(form).__name__}"

    texts = ["hi", "hello there"]
    batch = [
        texts, tok(texts, return_tensors="pt", padding=True, padding_side="left"),
    ]
    results = [both(pair, lambda lm, f=f: logits_of(lm, f)) for f in batch]
    assert torch.equal(results[0], results[1])
    ids, mask = lmf.padded(tok, texts)
    assert torch.equal(results[0], lmf.forward(tiny.hf, ids, mask))


def test_tensors_made_inside_the_trace_are_the_ones_used(tiny: Any, pair: Any, both: Any) -> None:
    # Temporaries die right after their line: the graph must not confuse them with
    # other tensors (e.g. the prompt's ids) that lived at the same address before.
    def experiment(lm: Any) -> Any:
        with lm.trace("hello"):
            h = tiny.layer0(lm).output[:, -1]
            one = (h + torch.full((32,), 1.0)).save()
            two = (h + torch.full((32,), 2.0)).save()
        return one, two

    one, two = both(pair, experiment)
    seen, _ = lmf.hook_view(tiny.hf, tiny.layer0(tiny.hf), lmf.padded(tiny.tokenizer, "hello")[0])
    assert torch.equal(one, seen[:, -1] + 1) and torch.equal(two, seen[:, -1] + 2)


# --- getters and setters against plain hooks ----------------------------------------------


def test_getter_is_what_a_forward_hook_sees(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi", "hello there"]

    def experiment(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(texts[0]):
                a = tiny.layer0(lm).output.save()
            with tracer.invoke(texts[1]):
                b = tiny.layer0(lm).output.save()
                mlp_in = tiny.layer0(lm).mlp.input.save()
            with tracer.invoke():
                whole = tiny.layer0(lm).output.save()
        return a, b, mlp_in, whole

    a, b, mlp_in, whole = both(pair, experiment)
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    layer = tiny.layer0(tiny.hf)
    seen, _ = lmf.hook_view(tiny.hf, layer, ids, mask)
    inputs: list[torch.Tensor] = []
    with lmf.hooks(layer.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))):
        lmf.forward(tiny.hf, ids, mask)
    assert isinstance(seen, torch.Tensor) and seen.shape == (2, 11, 32)
    assert torch.equal(whole, seen)
    assert torch.equal(a, seen[:1]) and torch.equal(b, seen[1:])
    assert torch.equal(mlp_in, inputs[0][1:])


def test_setters_act_as_a_hook_returning_the_edit(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi", "hello there"]
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    layer = tiny.layer0(tiny.hf)
    shift = torch.linspace(-1, 1, 32)

    def zero_last(lm: Any) -> Any:
        with lm.trace(texts):
            tiny.layer0(lm).output[:, -1] = 0
            logits = lm.output.logits.save()
        return logits

    def zero(out: torch.Tensor) -> torch.Tensor:
        out[:, -1] = 0
        return out

    assert torch.equal(both(pair, zero_last), lmf.edited_forward(tiny.hf, layer, zero, ids, mask))

    def replace(lm: Any) -> Any:
        with lm.trace(texts):
            tiny.layer0(lm).output = tiny.layer0(lm).output * 2 + shift
            logits = lm.output.logits.save()
        return logits

    ref = lmf.edited_forward(tiny.hf, layer, lambda out: out * 2 + shift, ids, mask)
    assert torch.equal(both(pair, replace), ref)

    def second_invoke_only(lm: Any) -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(texts[0]):
                first = lm.output.logits.save()
            with tracer.invoke(texts[1]):
                mlp = tiny.layer0(lm).mlp
                mlp.input = mlp.input * 0.5
                second = lm.output.logits.save()
        return first, second

    def halve_row_1(args: tuple) -> tuple:
        x = args[0].clone()
        x[1:] = x[1:] * 0.5
        return (x, *args[1:])

    with lmf.hooks(layer.mlp.register_forward_pre_hook(lambda m, args: halve_row_1(args))):
        ref = lmf.forward(tiny.hf, ids, mask)
    first, second = both(pair, second_invoke_only)
    assert torch.equal(torch.cat([first, second]), ref)
    assert not torch.equal(second, lmf.forward(tiny.hf, ids, mask)[1:])  # the edit did something


# --- generation ---------------------------------------------------------------------------------


def test_generation_steps_step_k_and_result(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi", "hello"]
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    width = ids.shape[1]

    def experiment(lm: Any) -> Any:
        with lm.generate(texts, max_new_tokens=N) as tracer:
            with tracer.all():
                h = tiny.layer0(lm).output.save()
                top = lm.lm_head.output[:, -1].argmax(-1).save()
            with tracer.step(0):
                h0 = tiny.layer0(lm).output.save()
            with tracer.step(2):
                h2 = tiny.layer0(lm).output.save()
            result = tracer.result.save()
        return h, top, h0, h2, result

    h, top, h0, h2, result = both(pair, experiment)
    seen: list[torch.Tensor] = []
    hook = (tiny.layer0(tiny.hf), lambda m, a, out: seen.append(out.detach().clone()))
    ref = lmf.generate(tiny.hf, ids, mask, N, hook=hook)
    assert not (ref[:, width:] == lmf.EOS).any(), "precondition: no EOS, so all N steps run"

    assert isinstance(h, list) and len(h) == N and len(top) == N
    assert h[0].shape == (2, width, 32)
    assert all(x.shape == (2, 1, 32) for x in h[1:])
    assert torch.equal(h0, h[0]) and torch.equal(h2, h[2])
    assert len(seen) == N and all(torch.equal(x, y) for x, y in zip(h, seen))
    assert torch.equal(result, ref)  # left-padded prompt + new tokens
    assert torch.equal(torch.stack(top, 1), ref[:, width:])  # step k picks new token k+1


def test_intervention_in_all_steps_matches_a_hook_during_generate(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi", "hello"]
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    steer = 3 * torch.randn(32, generator=torch.Generator().manual_seed(7))

    def experiment(lm: Any) -> Any:
        with lm.generate(texts, max_new_tokens=N) as tracer:
            with tracer.all():
                tiny.layer0(lm).output[:, -1] += steer
            result = tracer.result.save()
        return result

    def edit(out: torch.Tensor) -> torch.Tensor:
        out[:, -1] += steer
        return out

    steered = both(pair, experiment)
    ref = lmf.generate(tiny.hf, ids, mask, N, hook=(tiny.layer0(tiny.hf), lmf.output_editor(edit)))
    assert torch.equal(steered, ref)
    assert not torch.equal(steered, lmf.generate(tiny.hf, ids, mask, N)), "the steer changed nothing"


def test_invokes_in_generation_each_get_their_rows(tiny: Any, pair: Any, both: Any) -> None:
    texts = ["hi", "hello there"]
    ids, mask = lmf.padded(tiny.tokenizer, texts)
    steer = 3 * torch.randn(32, generator=torch.Generator().manual_seed(8))

    def experiment(lm: Any) -> Any:
        with lm.generate(max_new_tokens=N) as tracer:
            with tracer.invoke(texts[0]):
                first = tracer.result.save()
            with tracer.invoke(texts[1]):
                with tracer.all():
                    tiny.layer0(lm).output[:, -1] += steer
                second = tracer.result.save()
        return first, second

    def edit_row_1(out: torch.Tensor) -> torch.Tensor:
        out[1, -1] += steer
        return out

    first, second = both(pair, experiment)
    hook = (tiny.layer0(tiny.hf), lmf.output_editor(edit_row_1))
    ref = lmf.generate(tiny.hf, ids, mask, N, hook=hook)
    assert first.shape == second.shape == (1, ids.shape[1] + N)
    assert torch.equal(first, ref[:1]) and torch.equal(second, ref[1:])
    # The first prompt is untouched by the second invoke's steering: as if run alone.
    alone_ids, alone_mask = lmf.padded(tiny.tokenizer, texts[0])
    alone = lmf.generate(tiny.hf, alone_ids, alone_mask, N)
    assert torch.equal(first[:, -(alone.shape[1]) :], alone)


def test_seeded_sampling_is_reproducible_and_private(tiny: Any, pair: Any, both: Any) -> None:
    def sample(lm: Any, seed: int) -> Any:
        with lm.generate("hello", max_new_tokens=8, do_sample=True, seed=seed) as tracer:
            tokens = tracer.result.save()
        return tokens

    torch.manual_seed(123)
    a = both(pair, lambda lm: sample(lm, 1))
    after = torch.rand(4)
    b = both(pair, lambda lm: sample(lm, 1))
    c = both(pair, lambda lm: sample(lm, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "different seeds sampled the same 8 tokens"
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after), "seeded sampling consumed the global generator"


@pytest.mark.parametrize("how", ["eos_token_id", "steering"])
def test_step_that_never_ran_raises_on_value_only(tiny: Any, pair: Any, how: str) -> None:
    ids, mask = lmf.padded(tiny.tokenizer, "hello")
    if how == "eos_token_id":
        # The greedy first token becomes EOS: generation ends after step 0.
        eos = int(lmf.generate(tiny.hf, ids, mask, 1)[0, -1])
        kwargs: dict[str, Any] = {"eos_token_id": eos}
    else:
        eos, kwargs = lmf.EOS, {}
    for lm in (pair.local, pair.roundtrip):
        with lm.generate("hello", max_new_tokens=N, **kwargs) as tracer:
            with tracer.step(0):
                if how == "steering":
                    lm.lm_head.output[:, -1, lmf.EOS] = 1e4  # forces EOS as the first new token
                h0 = tiny.layer0(lm).output.save()
            with tracer.all():
                every = lm.lm_head.output.save()
            with tracer.step(2):
                h2 = tiny.layer0(lm).output.save()
                line = here()
            result = tracer.result.save()
        assert h0.value.shape == (1, 5, 32)
        assert len(every.value) == 1
        assert torch.equal(result.value, torch.cat([ids, torch.tensor([[eos]])], 1))
        with pytest.raises(OutOfOrderError, match="never") as info:
            h2.value  # noqa: B018
        assert info.value.where == _previous(line)


# --- scan ---------------------------------------------------------------------------------------


def test_scan_gives_shapes_without_running_the_model(tiny: Any, pair: Any) -> None:
    for lm in (pair.local, pair.roundtrip):
        with counting(tiny.hf) as calls:
            with lm.scan(["hi", "hello there"]):
                shape = tiny.layer0(lm).output.shape.save()
                tiny.layer0(lm).output[:, -1] = 0  # setters are scanned too
                logits = lm.output.logits.save()
        assert calls == []
        assert shape.value == torch.Size([2, 11, 32])
        assert logits.shape == (2, 11, lmf.VOCAB)


def test_scan_reports_a_bad_index_at_the_users_line_before_running(tiny: Any, pair: Any) -> None:
    for lm in (pair.local, pair.roundtrip):
        with counting(tiny.hf) as calls:
            with pytest.raises(ExecutionError, match="out of bounds") as info:
                with lm.scan("hello"):
                    tiny.layer0(lm).output[:, 10].save()
                    line = here()
            assert info.value.where == _previous(line)

            with pytest.raises(ExecutionError, match="out of bounds") as info:
                with lm.trace("hello", validate=True):
                    tiny.layer0(lm).output[:, 10].save()
                    line = here()
            assert info.value.where == _previous(line)
        assert calls == [], "the real model ran although the scan found the error"


def _next(where: str) -> str:
    path, line = where.rsplit(":", 1)
    return f"{path}:{int(line) + 1}"


def _previous(where: str) -> str:
    file, line = where.rsplit(":", 1)
    return f"{file}:{int(line) - 1}"


def test_scan_works_before_weights_load(nnglass_cache: Any, capsys: pytest.CaptureFixture) -> None:
    prompt = "The truth is the"
    for roundtrip in (False, True):
        lm = lmf.make_lm(lambda: LanguageModel("smollm2-135m"), roundtrip)
        print(lm)
        tree = capsys.readouterr().out
        assert "(layers): ModuleList" in tree and "LlamaDecoderLayer" in tree and "(lm_head)" in tree
        n = len(lm.tokenizer(prompt)["input_ids"])
        with lm.scan(prompt):
            lm.model.layers[16].mlp.down_proj.input[:, -1, [394, 1000, 1200]] = 10
            shape = lm.model.layers[16].mlp.down_proj.input.shape.save()
            logits = lm.output.logits.save()
        assert shape.value == torch.Size([1, n, 1536])
        assert logits.shape == (1, n, 49152)
        assert lm._loaded is None, "the scan loaded the weights"


def test_print_shows_the_module_tree(tiny: Any, pair: Any, capsys: pytest.CaptureFixture) -> None:
    print(pair.local)
    out = capsys.readouterr().out
    assert repr(tiny.hf) in out
    block = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer"}[tiny.arch]
    assert block in out and "(lm_head): Linear(in_features=32, out_features=100" in out


# --- what a trace returns -------------------------------------------------------------------------


def test_model_output_keeps_its_class(tiny: Any, pair: Any, both: Any) -> None:
    def experiment(lm: Any) -> Any:
        with lm.trace("hello"):
            out = lm.output.save()
        return out

    out = both(pair, experiment)
    ids, _ = lmf.padded(tiny.tokenizer, "hello")
    with torch.no_grad():
        plain = tiny.hf(input_ids=ids, use_cache=False)
    assert type(out) is type(plain)  # the transformers ModelOutput keeps its class
    assert torch.equal(out.logits, plain.logits)


@pytest.mark.parametrize("where", ["trace", "generate"])
def test_kv_cache_is_never_a_value(tiny: Any, pair: Any, where: str) -> None:
    """The root output a graph sees has no KV cache; asking for one is a clear error."""

    def opened(lm: Any) -> Any:
        if where == "trace":
            return lm.trace("hello", use_cache=True)
        return lm.generate("hello", max_new_tokens=2)

    for lm in (pair.local, pair.roundtrip):
        with opened(lm):
            out = lm.output.save()
        assert out.value.get("past_key_values") is None and out.value.logits is not None
        with pytest.raises(NNglassError, match=r"(?i)cache") as info:
            with opened(lm):
                line = here()
                lm.output.past_key_values.save()
        assert info.value.where == _next(line)
