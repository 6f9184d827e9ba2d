"""The per-step generation hook (runtime/steps.py): what a listener hears, step by step,
adds up to exactly the run's own result and saved values."""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import torch

from nnglass import LanguageModel, Recorder


def test_steps_add_up_to_the_result_and_the_saved_values(tiny: Any) -> None:
    rec = Recorder()
    lm = LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name="tiny", backend=rec)
    layer = tiny.layer0(lm)
    with lm.generate(["ab", "cde"], max_new_tokens=5, remote=True) as tr:
        with tr.all():
            every = layer.output[0][:, -1].save()
            layer.output[0][:] *= 1.5
        with tr.step(2):
            third = lm.output.logits[:, -1].argmax(-1).save()
        result = tr.result.save()
    graph = rec.last
    heard: list[tuple[int, torch.Tensor, dict[int, Any]]] = []
    values = lm.run_graph(graph, on_step=lambda step, tokens, saved: heard.append((step, tokens, saved)))
    plain = lm.run_graph(graph)
    assert torch.equal(values[result._id], plain[result._id])
    generated = values[result._id][:, 3:]  # after the widest prompt (left-padded)
    assert [s for s, _, _ in heard] == list(range(generated.shape[1]))
    assert torch.equal(torch.cat([t for _, t, _ in heard], dim=1), generated)
    entries = [e for _, _, saved in heard for e in saved.get(every._id, [])]
    assert len(entries) == len(values[every._id])
    for got, want in zip(entries, values[every._id]):
        assert torch.equal(got, want)
    assert [s for s, _, saved in heard if third._id in saved] == [2]
    assert torch.equal(heard[2][2][third._id], values[third._id])
    assert all(result._id not in saved for _, _, saved in heard)  # saved after the last step
