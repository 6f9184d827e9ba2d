"""A tiny random Llama on 2 tensor-parallel ranks against the same model unsharded:
every getter sees the whole tensor (colwise outputs, the heads between them, the rowwise
inputs), every setter's edit is what the unsharded model gets, to 1e-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nnglass import ExecutionError, GraphError
from nnglass.graph import wire
from nnglass.graph.results import decode_results
from service_fixtures import recording

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = ["Hello world", "hi"]


def _close(a: Any, b: Any, **tol: float) -> None:
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            _close(x, y, **tol)
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, **(tol or TOL))


def _both(pair: Any, experiment: Any) -> None:
    for mine, ref in zip(experiment(pair.sharded), experiment(pair.alone), strict=True):
        _close(mine.value if hasattr(mine, "value") else mine, ref.value if hasattr(ref, "value") else ref)


def test_getters_see_whole_tensors(tiny_pair: Any) -> None:
    def read(lm: Any) -> list[Any]:
        layer = lm.model.layers[0]
        with lm.trace(PROMPTS):
            saved = [layer.self_attn.q_proj.output.save(), layer.self_attn.k_proj.output.save(),
                     layer.self_attn.o_proj.input.save(), layer.mlp.act_fn.output.save(),
                     layer.mlp.down_proj.input.save(), layer.mlp.down_proj.output.save(),
                     layer.self_attn.output[0].save(), layer.mlp.output.save(), layer.output.save(),
                     lm.model.layers[1].mlp.up_proj.output.save(), lm.output.logits.save()]
        return saved

    _both(tiny_pair, read)
    with tiny_pair.sharded.trace("hi"):
        q = tiny_pair.sharded.model.layers[0].self_attn.q_proj.output.save()
    assert q.value.shape[-1] == tiny_pair.alone.config.hidden_size  # whole, not one rank's half


def test_setters_edit_what_the_unsharded_model_gets(tiny_pair: Any) -> None:
    def edit(lm: Any) -> list[Any]:
        layer = lm.model.layers[0]
        with lm.trace(PROMPTS):
            layer.self_attn.q_proj.output[:, :, :20] = 0.5 * layer.self_attn.q_proj.output[:, :, :20]
            layer.mlp.down_proj.input[:, -1] = 3.0  # both ranks' halves of the rowwise input
            layer.mlp.act_fn.output[:] = layer.mlp.act_fn.output * 2  # in place
            lm.model.layers[1].output[0][:, 0] = 1.0
            out = [layer.mlp.down_proj.input.save(), layer.output.save(), lm.output.logits.save()]
        return out

    _both(tiny_pair, edit)


def test_skip_of_a_sharded_module(tiny_pair: Any) -> None:
    def skip(lm: Any) -> list[Any]:
        with lm.trace("Hello"):
            proj = lm.model.layers[0].self_attn.v_proj
            proj.skip(torch.ones(1, 5, 16))
            return [lm.output.logits.save()]

    _both(tiny_pair, skip)


def test_gradients_at_whole_sites(tiny_pair: Any) -> None:
    def grads(lm: Any) -> list[Any]:
        with lm.trace("Hello world"):
            g0 = lm.model.layers[0].output.grad.save()
            g1 = lm.model.layers[1].mlp.output.grad.save()
            lm.output.logits[:, -1].sum().backward()
        return [g0, g1]

    _both(tiny_pair, grads)


def test_gradients_at_sharded_sites(tiny_pair: Any) -> None:
    def grads(lm: Any) -> list[Any]:
        layer = lm.model.layers[0]
        with lm.trace(PROMPTS):
            q = layer.self_attn.q_proj.output.grad.save()
            down = layer.mlp.down_proj.input
            d = down.grad.save()
            loss = lm.output.logits[:, -1].sum() + (down * down).sum()  # the graph's own use of it too
            loss.backward()
        return [q, d]

    _both(tiny_pair, grads)


def test_a_gradient_edited_at_a_sharded_site(tiny_pair: Any) -> None:
    def edit(lm: Any) -> list[Any]:
        with lm.trace("Hello world"):
            proj = lm.model.layers[1].self_attn.v_proj.output
            proj.grad = proj.grad * 0.5
            g = lm.model.layers[0].output.grad.save()
            lm.output.logits[:, -1].sum().backward()
        return [g]

    _both(tiny_pair, edit)


def test_parameters_read_whole(tiny_pair: Any) -> None:
    def weights(lm: Any) -> list[Any]:
        with lm.trace("hi"):
            layer = lm.model.layers[0]
            w = [layer.self_attn.q_proj.weight.save(), layer.mlp.down_proj.weight.save(),
                 lm.model.embed_tokens.weight.save()]
        return w

    _both(tiny_pair, weights)


def test_module_calls_and_logit_lens(tiny_pair: Any) -> None:
    def lens(lm: Any) -> list[Any]:
        with lm.trace(PROMPTS):
            out = [lm.lm_head(lm.model.norm(layer.output)).save() for layer in lm.model.layers]
            out.append(lm.model.layers[1].mlp.down_proj(lm.model.layers[0].mlp.down_proj.input).save())
        return out

    _both(tiny_pair, lens)


def test_steered_generation_gives_the_same_tokens(tiny_pair: Any) -> None:
    def steer(lm: Any) -> list[Any]:
        with lm.generate("Hello", max_new_tokens=6) as tracer:
            with tracer.all():
                lm.model.layers[0].mlp.down_proj.input[:, -1, :8] += 2.0
            out = tracer.result.save()
        return [out]

    mine, = steer(tiny_pair.sharded)
    ref, = steer(tiny_pair.alone)
    assert torch.equal(mine.value, ref.value)


def test_sampling_draws_the_same_tokens_on_every_rank(tiny_pair: Any) -> None:
    """Unseeded, each rank would draw its own tokens and their forwards would part ways;
    the group hands every rank one seed. Seeded, it is the unsharded model's draw."""
    def sample(lm: Any, seed: int | None) -> torch.Tensor:
        # min_new_tokens: a random model may well draw EOS early, and the length is the check
        with lm.generate("Hello", max_new_tokens=8, min_new_tokens=8, do_sample=True, seed=seed) as tracer:
            out = tracer.result.save()
        return out.value

    assert sample(tiny_pair.sharded, None).shape == (1, 13)
    assert torch.equal(sample(tiny_pair.sharded, 7), sample(tiny_pair.alone, 7))


def test_a_session_patches_one_trace_with_another(tiny_pair: Any) -> None:
    def patch(lm: Any) -> list[Any]:
        with lm.session():
            with lm.trace("Paris is"):
                h = lm.model.layers[0].self_attn.q_proj.output[:, -1]
            with lm.trace("Rome is!"):
                lm.model.layers[0].self_attn.q_proj.output[:, -1] = h
                logits = lm.output.logits.save()
        return [logits]

    _both(tiny_pair, patch)


def test_a_json_round_trip_gives_bitwise_equal_results(tiny_pair: Any) -> None:
    lm = tiny_pair.sharded
    with recording(lm.trace(PROMPTS)) as tracer:
        lm.model.layers[0].mlp.down_proj.input[:, -1] = 3.0
        lm.model.layers[1].self_attn.q_proj.output.save()
        lm.output.logits.save()
    graph = tracer.graph
    first, again = lm.run_graph(graph), lm.run_graph(wire.roundtrip(graph))
    assert first.keys() == again.keys()
    for k in first:
        assert torch.equal(getattr(first[k], "logits", first[k]), getattr(again[k], "logits", again[k]))


def test_an_error_fails_the_job_with_the_users_line_and_the_ranks_stay_ready(tiny_pair: Any) -> None:
    lm = tiny_pair.sharded
    with pytest.raises(ExecutionError) as e:
        with lm.trace("Hello"):
            lm.model.layers[0].self_attn.q_proj.output[:, :, 999].save()  # past the whole width
    assert e.value.where.endswith(f"{Path(__file__).name}:{_line('[:, :, 999]')}")
    test_getters_see_whole_tensors(tiny_pair)


def test_source_operations_are_refused_at_the_users_line(tiny_pair: Any) -> None:
    """Inside a sharded attention each rank computes its own heads: no whole value to show."""
    lm = tiny_pair.sharded
    with pytest.raises(GraphError, match="not available on a tensor-parallel model") as e:
        with lm.trace("Hello"):
            lm.model.layers[0].self_attn.source.scaled_dot_product_attention_0.output.save()
    assert e.value.where.endswith(f"{Path(__file__).name}:{_line('scaled_dot_product_attention_0.output')}")
    test_getters_see_whole_tensors(tiny_pair)


def test_a_failure_on_one_rank_fails_the_job_on_all(tiny_pair: Any, fail_file: Path) -> None:
    lm = tiny_pair.sharded
    fail_file.write_text("")
    try:
        with pytest.raises(ExecutionError, match=r"on rank 1: .*test failure on rank 1 only"):
            with lm.trace("Hello"):
                lm.output.logits.save()
    finally:
        fail_file.unlink()
    test_setters_edit_what_the_unsharded_model_gets(tiny_pair)


def _graphs(lm: Any) -> list[Any]:
    graphs = []
    for prompt, edit in (("hello there", 0.0), ("hi", 2.0), ("good day!!!", -1.0)):
        with recording(lm.trace(prompt)) as tracer:
            lm.model.layers[0].mlp.down_proj.input[:, -1, :8] = edit
            lm.model.layers[1].self_attn.q_proj.output.save()
            lm.output.logits.save()
        graphs.append(tracer.graph)
    return graphs


def _job(tmp: Path, graph: Any, i: int) -> dict[str, Any]:
    data, tensors = wire.encode(graph)
    (tmp / f"g{i}.json").write_bytes(data)
    if tensors:
        (tmp / f"t{i}.safetensors").write_bytes(tensors)
    return {"job": f"job{i}", "graph": str(tmp / f"g{i}.json"),
            "tensors": str(tmp / f"t{i}.safetensors") if tensors else None,
            "result": str(tmp / f"r{i}.safetensors"), "limits": {"run_seconds": 60}}


def test_co_tenant_jobs_share_a_pass_on_the_rank_group(tiny_pair: Any, tmp_path: Path) -> None:
    graphs = _graphs(tiny_pair.alone)
    handle = tiny_pair.sharded._rank_group().handle  # rank 0: a worker (server/worker.py)
    request = {"batch": [_job(tmp_path, g, i) for i, g in enumerate(graphs)]}
    answers = handle.run(request, timeout=120)["batch"]
    assert [a["status"] for a in answers] == ["COMPLETED"] * 3
    assert all(a.get("shared") == 3 for a in answers)
    for i, graph in enumerate(graphs):
        remote = decode_results((tmp_path / f"r{i}.safetensors").read_bytes())
        for node_id, value in tiny_pair.alone.run_graph(graph).items():
            torch.testing.assert_close(getattr(remote[node_id], "logits", remote[node_id]),
                                       getattr(value, "logits", value), **TOL)


def _line(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text and "def " not in text)
