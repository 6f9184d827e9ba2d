"""The plots draw what the saved values say: each test records a real trace on a tiny
model, computes the expected numbers and tokens with plain PyTorch (forward hooks,
`torch.autograd.grad`), and reads back what the figure holds: the image array, the cell
texts, the tick labels, the colourbar, and the saved PNG/SVG.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lm_fixtures as lmf
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from nnglass import viz

PROMPT = "Hi, you!"  # one token per character; the space shows as "␣"
VOCAB = lmf.SPECIALS + lmf.CHARS


def shown(token_id: int) -> str:
    """How a char token is labelled, written out independently of nnglass.viz (ids 98, 99
    are in the model's vocabulary but not the tokenizer's)."""
    if token_id >= len(VOCAB):
        return f"#{token_id}"
    text = VOCAB[token_id]
    return "␣" if text == " " else text


def prompt_labels() -> list[str]:
    return ["␣" if c == " " else c for c in PROMPT]


def ids_of(lm, prompt: str = PROMPT) -> torch.Tensor:
    return lm.tokenizer(prompt, return_tensors="pt")["input_ids"]


def ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def assert_heatmap_frame(fig: Figure, xlabels: list[str], ylabels: list[str], colorbar: str) -> None:
    ax, bar = fig.axes  # the heatmap and its colourbar, nothing else
    assert ticks(ax.get_xticklabels()) == xlabels
    assert ticks(ax.get_yticklabels()) == ylabels
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert bar.get_ylabel() == colorbar
    assert len(ax.images) == 1


# --- logit lens -------------------------------------------------------------------------


@torch.no_grad()
def plain_lens(hf, ids: torch.Tensor) -> torch.Tensor:
    """softmax(lm_head(norm(layer i output))) for each layer: [layers, positions, vocab]."""
    rows = []
    for layer in hf.model.layers:
        hidden, _ = lmf.hook_view(hf, layer, ids)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        rows.append(torch.softmax(hf.lm_head(hf.model.norm(hidden))[0], dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("top_k", [1, 2])
def test_logit_lens_draws_the_top_tokens_and_their_probabilities(llama, top_k: int) -> None:
    with llama.trace(PROMPT):
        lens = [llama.lm_head(llama.model.norm(llama.model.layers[i].output)).save() for i in range(2)]
    probs = plain_lens(llama.module, ids_of(llama))
    top_p, top_ids = probs.topk(top_k, dim=-1)

    fig = viz.logit_lens(lens, llama.tokenizer, tokens=PROMPT, top_k=top_k)

    assert_heatmap_frame(fig, prompt_labels(), ["0", "1"], "probability of the top token")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), top_p[..., 0].numpy(), atol=1e-6)
    assert ax.images[0].origin == "lower"  # layer 0 at the bottom, depth grows upward
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 2 * len(PROMPT)
    expected = ["\n".join(shown(int(i)) for i in top_ids[layer, pos])
                for layer in range(2) for pos in range(len(PROMPT))]
    assert texts == expected
    # The cell texts sit on their cells (row-major: layer, then position).
    cells = [(p, layer) for layer in range(2) for p in range(len(PROMPT))]
    assert [t.get_position() for t in ax.texts] == cells


def test_logit_lens_accepts_values_a_stacked_tensor_and_ids(llama) -> None:
    with llama.trace(PROMPT):
        lens = [llama.lm_head(llama.model.norm(llama.model.layers[i].output)).save() for i in range(2)]
    reference = viz.logit_lens(lens, llama.tokenizer, tokens=PROMPT).axes[0]
    variants = [
        viz.logit_lens([s.value for s in lens], llama.tokenizer, tokens=ids_of(llama)[0]),  # [1, T, V] each
        viz.logit_lens(torch.stack([s.value[0] for s in lens]), llama.tokenizer, tokens=list(PROMPT)),
        viz.logit_lens(torch.stack([s.value for s in lens]), llama.tokenizer, tokens=PROMPT),  # [L, 1, T, V]
    ]
    for fig in variants:
        ax = fig.axes[0]
        np.testing.assert_array_equal(ax.images[0].get_array(), reference.images[0].get_array())
        assert [t.get_text() for t in ax.texts] == [t.get_text() for t in reference.texts]
        assert ticks(ax.get_xticklabels()) == prompt_labels()
    named = viz.logit_lens(lens, llama.tokenizer, tokens=PROMPT, layers=["embed+1", "out"])
    assert ticks(named.axes[0].get_yticklabels()) == ["embed+1", "out"]
    bare = viz.logit_lens(lens)  # no tokenizer: ids in the cells, positions on the axis
    assert ticks(bare.axes[0].get_xticklabels()) == [str(i) for i in range(len(PROMPT))]
    _, ids = viz.top_tokens(lens)
    assert [t.get_text() for t in bare.axes[0].texts] == [str(int(i)) for i in ids[..., 0].flatten()]


def test_saved_png_and_svg(llama, tmp_path: Path) -> None:
    with llama.trace(PROMPT):
        lens = [llama.lm_head(llama.model.norm(llama.model.layers[i].output)).save() for i in range(2)]
    fig = viz.logit_lens(lens, llama.tokenizer, tokens=PROMPT, title="lens of Hi", figsize=(6, 3))
    fig.savefig(tmp_path / "lens.png", dpi=50)
    fig.savefig(tmp_path / "lens.svg")
    image = imread(tmp_path / "lens.png")
    assert image.shape == (150, 300, 4)
    assert image[..., :3].std() > 0.1  # something was drawn, not a blank canvas
    # Sized to fit: wider with more positions, taller with more layers.
    auto = viz.logit_lens(lens, llama.tokenizer, tokens=PROMPT)
    auto.savefig(tmp_path / "auto.png", dpi=40)
    width, height = auto.get_size_inches()
    assert imread(tmp_path / "auto.png").shape[:2] == pytest.approx((height * 40, width * 40), abs=1)
    longer = viz.logit_lens(torch.zeros(4, 2 * len(PROMPT), 100), llama.tokenizer).get_size_inches()
    assert longer[0] > width and longer[1] > height
    svg = (tmp_path / "lens.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for text in ["lens of Hi", "layer", *set(prompt_labels()) - {","}]:
        assert f"<!-- {text} -->" in svg, text  # matplotlib names each drawn text in the SVG


# --- activation patching ----------------------------------------------------------------


def test_patching_heatmap_draws_the_effects(llama) -> None:
    clean, corrupt = "Hi, you!", "Yo, him?"
    n_layers, n_pos = 2, len(clean)
    ids = ids_of(llama, clean)
    answer = int(lmf.forward(llama.module, ids)[0, -1].argmax())
    # Every (layer, position) patch of clean into corrupted, as invokes of one batch.
    with llama.trace() as tracer:
        with tracer.invoke(clean):
            hidden = [llama.model.layers[i].output for i in range(n_layers)]
        with tracer.invoke(corrupt):
            base = llama.output.logits[0, -1, answer].save()
        patched = []
        for layer in range(n_layers):
            for pos in range(n_pos):
                with tracer.invoke(corrupt):
                    llama.model.layers[layer].output[:, pos] = hidden[layer][:, pos]
                    patched.append(llama.output.logits[0, -1, answer].save())
    effect = torch.stack([p.value for p in patched]).reshape(n_layers, n_pos) - base.value

    hf, bad = llama.module, ids_of(llama, corrupt)
    plain = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        seen, _ = lmf.hook_view(hf, hf.model.layers[layer], ids)
        for pos in range(n_pos):

            def edit(out, pos=pos, seen=seen):
                out[:, pos] = seen[:, pos]
                return out

            plain[layer, pos] = lmf.edited_forward(hf, hf.model.layers[layer], edit, bad)[0, -1, answer]
    plain -= lmf.forward(hf, bad)[0, -1, answer]
    lmf.assert_close(effect, plain, atol=1e-4)

    fig = viz.patching_heatmap(effect, tokens=clean, tokenizer=llama.tokenizer, metric="logit of the answer")
    assert_heatmap_frame(fig, ["␣" if c == " " else c for c in clean], ["0", "1"], "logit of the answer")
    image = fig.axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), plain.numpy(), atol=1e-4)
    limit = float(effect.abs().max())
    assert image.norm.vmin == pytest.approx(-limit) and image.norm.vmax == pytest.approx(limit)
    assert image.to_rgba(0.0)[:3] == pytest.approx((0.97, 0.97, 0.97), abs=0.03)  # zero is white
    assert len(fig.axes[0].texts) == 0
    annotated = viz.patching_heatmap([[float(v) for v in row] for row in effect], annotate=True)
    assert [t.get_text() for t in annotated.axes[0].texts] == [f"{v:.2g}" for v in effect.flatten().tolist()]


# --- attribution --------------------------------------------------------------------------


def test_attribution_bars_are_gradient_times_activation(llama) -> None:
    with llama.trace(PROMPT):
        embedded = llama.model.embed_tokens.output
        grad = embedded.grad.save()
        value = embedded.save()
        llama.output.logits[0, -1].max().backward()

    hf, ids = llama.module, ids_of(llama)
    seen = []
    handle = hf.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(out))
    with lmf.hooks(handle):
        logits = hf(input_ids=ids).logits
    (plain_grad,) = torch.autograd.grad(logits[0, -1].max(), seen[0])
    expected = (plain_grad * seen[0]).sum(-1)[0].detach()

    lmf.assert_close(viz.attribution_scores(grad, value), expected, atol=1e-7)
    fig = viz.attribution(grad, value, tokens=PROMPT, tokenizer=llama.tokenizer)
    ax, bar = fig.axes
    heights = torch.tensor([p.get_height() for p in ax.patches], dtype=torch.float32)
    lmf.assert_close(heights, expected, atol=1e-7)
    assert [p.get_x() + p.get_width() / 2 for p in ax.patches] == pytest.approx(range(len(PROMPT)))
    assert ticks(ax.get_xticklabels()) == prompt_labels()
    assert ax.get_xlabel() and ax.get_ylabel() == "gradient \u00d7 activation"
    assert bar.get_ylabel() == "attribution"
    for patch, score in zip(ax.patches, expected.tolist()):
        r, _, b, _ = patch.get_facecolor()
        assert (r > b) == (score > 0), "positive scores red, negative blue"


# --- attention ------------------------------------------------------------------------------


def test_attention_pattern_draws_one_head_with_the_future_masked(gpt2) -> None:
    with gpt2.trace(PROMPT):
        weights = gpt2.transformer.h[1].attn.output[1].save()
    # A plain forward hook (output_attentions=True would leave transformers' own hooks on).
    seen, _ = lmf.hook_view(gpt2.module, gpt2.module.transformer.h[1].attn, ids_of(gpt2))
    plain = seen[1][0]

    fig = viz.attention_pattern(weights, head=1, tokens=PROMPT, tokenizer=gpt2.tokenizer)
    assert_heatmap_frame(fig, prompt_labels(), prompt_labels(), "attention probability")
    data = fig.axes[0].images[0].get_array()
    future = np.triu(np.ones((len(PROMPT),) * 2, dtype=bool), k=1)
    np.testing.assert_array_equal(np.ma.getmaskarray(data), future)
    np.testing.assert_allclose(data.data[~future], plain[1].numpy()[~future], atol=1e-6)
    assert fig.axes[0].get_title() == "attention, head 1"
    full = viz.attention_pattern(weights.value[0], head=-1, tokens=list(PROMPT), causal=False)
    whole = full.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.ma.getdata(whole), plain[-1].numpy(), atol=1e-6)
    assert not np.ma.getmaskarray(whole).any()


# --- what the plots refuse, and what importing costs ----------------------------------------


def test_wrong_shapes_and_token_counts_say_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"expected a list with one \[positions, vocab\]"):
        viz.logit_lens(torch.zeros(5))
    with pytest.raises(ValueError, match="3 tokens for 4 positions"):
        viz.patching_heatmap(torch.zeros(2, 4), tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match="head 4 is out of range for 2 heads"):
        viz.attention_pattern(torch.zeros(2, 3, 3), head=4)
    with pytest.raises(ValueError, match="same site"):
        viz.attribution_scores(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="needs `tokenizer=`"):
        viz.attribution(torch.zeros(3, 4), torch.zeros(3, 4), tokens="abc")


def test_import_nnglass_does_not_import_matplotlib() -> None:
    code = ("import sys, torch, nnglass\n"
            "net = nnglass.NNModel(torch.nn.Linear(2, 2))\n"
            "with net.trace(torch.ones(1, 2)):\n"
            "    out = net.output.save()\n"
            "assert out.shape == (1, 2)\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
