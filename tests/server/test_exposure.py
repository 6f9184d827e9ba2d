"""A weights-hidden policy keeps the weights hidden, tried the way a curious client would.

The provider policy is the one `examples/server.toml` ships (`provider-135m`), applied to
the tiny Llama; two variants widen it to every module (weights still hidden), with and
without `expose_embeddings`. Each attack is tried in variants (other keys, other ops,
other layers, other steps) and must fail at the attacker's line; what is allowed must
equal the same experiment run locally.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

import nnglass
from nnglass import ExecutionError, LanguageModel, PolicyError, _config
from nnglass.server.config import Policy, load_config
from nnglass.server.exposure import lookup_sites

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "server.toml"
SHIPPED = load_config(EXAMPLE).model("provider-135m")
assert SHIPPED is not None and not SHIPPED.policy.weights_visible
PROVIDER = SHIPPED.policy
EVERYTHING_HIDDEN = replace(PROVIDER, read=["**"], write=["**"])
EXPOSED = replace(EVERYTHING_HIDDEN, expose_embeddings=True)
MODELS = {"provider": PROVIDER, "hidden": EVERYTHING_HIDDEN, "exposed": EXPOSED}


def model_toml(name: str, source: Path, policy: Policy) -> str:
    """A `[[models]]` table with `policy` exactly (limits included)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(f'"{p}"' for p in v) + "]"
        return repr(v)

    lines = [f'[[models]]\nname = "{name}"\nsource = "{source}"\nthreads = {torch.get_num_threads()}',
             "[models.policy]"]
    lines += [f"{k} = {value(getattr(policy, k))}" for k in
              ("read", "write", "weights_visible", "gradients", "module_calls", "expose_embeddings")]
    lines.append("[models.policy.limits]")
    lines += [f"{k} = {value(v)}" for k, v in vars(policy.limits).items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tiny_config: Callable[..., str],
           tiny_dir: Path) -> Iterator[Any]:
    extra = "".join(model_toml(name, tiny_dir, policy) for name, policy in MODELS.items())
    server = start_server("exposure", tiny_config(extra_model=extra))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server: Any) -> str:
    return server.keys.create("curious")[1]


@pytest.fixture(scope="module")
def lms(tiny_dir: Path, server: Any, key: str) -> Iterator[dict[str, LanguageModel]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_config, "_overrides", {})
        nnglass.configure(host=server.url, api_key=key)
        yield {name: LanguageModel(str(tiny_dir), name=name) for name in MODELS}


def line(offset: int = 0) -> str:
    frame = sys._getframe(1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno + offset}"


# --- lookup sites are measured --------------------------------------------------------


def test_lookup_sites_of_llama_and_gpt2() -> None:
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).eval()
    attn = "model.layers.0.self_attn"
    assert lookup_sites(llama) == {
        ("model.embed_tokens", "output"), ("model.rotary_emb", "input"), ("model.rotary_emb", "output"),
        ("model.layers.0", "input"), ("model.layers.0.input_layernorm", "input"),
        ("model.layers.0.input_layernorm", "output"), (attn, "input"),
        *((f"{attn}.{p}_proj", kind) for p in "qkv" for kind in ("input", "output")),
    }
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0)).eval()
    assert lookup_sites(gpt2) == {
        ("transformer.wte", "output"), ("transformer.wpe", "output"), ("transformer.drop", "input"),
        ("transformer.drop", "output"), ("transformer.h.0", "input"), ("transformer.h.0.ln_1", "input"),
        ("transformer.h.0.ln_1", "output"), ("transformer.h.0.attn", "input"),
        ("transformer.h.0.attn.c_attn", "input"), ("transformer.h.0.attn.c_attn", "output"),
    }


def test_models_say_which_sites_reveal_what(server: Any, key: str) -> None:
    with server.client(key) as http:
        models = {m["name"]: m for m in http.get("/v1/models").json()}
    for name, readable in (("provider", False), ("hidden", False), ("exposed", True)):
        exposure = models[name]["exposure"]
        assert {"model.embed_tokens.output", "model.layers.0.input"} <= set(exposure["lookup_sites"])
        assert "model.layers.1.input" not in exposure["lookup_sites"]
        assert exposure["lookup_sites_readable"] is readable
        assert models[name]["policy"]["expose_embeddings"] is (name == "exposed")
        assert "only `.input`" in exposure["inputs_show"]


# --- the embedding matrix -------------------------------------------------------------


@pytest.mark.parametrize(("model", "site"), [
    ("provider", "model.layers.0.input"), ("provider", "model.layers.0.inputs"),
    ("hidden", "model.embed_tokens.output"), ("hidden", "model.layers.0.input"),
    ("hidden", "model.layers.0.input_layernorm.output"), ("hidden", "model.layers.0.self_attn.q_proj.output"),
    ("hidden", "model.layers.0.self_attn.v_proj.input"), ("hidden", "model.rotary_emb.output"),
])
@pytest.mark.parametrize("mode", ["trace", "generate step 1"])
def test_lookups_of_the_weights_are_refused(lms: dict[str, LanguageModel], model: str, site: str,
                                            mode: str) -> None:
    lm = lms[model]
    path, kind = site.rsplit(".", 1)
    with pytest.raises(PolicyError, match="lookup") as info:
        if mode == "trace":
            with lm.trace("abcd", remote=True):
                where = line(1)
                getattr(_envoy(lm, path), kind)[0].save()
        else:
            with lm.generate("abcd", max_new_tokens=2, remote=True) as tracer:
                with tracer.step(1):
                    where = line(1)
                    getattr(_envoy(lm, path), kind)[0].save()
    assert info.value.where == where


def _envoy(lm: LanguageModel, path: str) -> Any:
    node: Any = lm
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def test_later_sites_stay_readable_and_match_a_local_run(lms: dict[str, LanguageModel],
                                                         tiny_dir: Path) -> None:
    local = LanguageModel(str(tiny_dir), name="local")
    for name in ("provider", "hidden"):
        lm = lms[name]
        with lm.trace("abcd", remote=True):
            a = lm.model.layers[1].input.save()
            b = lm.model.layers[0].output.save()
        with local.trace("abcd"):
            ra = local.model.layers[1].input.save()
            rb = local.model.layers[0].output.save()
        assert torch.equal(a.value, ra.value) and torch.equal(b.value, rb.value)


def test_expose_embeddings_opts_in(lms: dict[str, LanguageModel], tiny_dir: Path) -> None:
    lm = lms["exposed"]
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with lm.trace(ids, remote=True):
        rows = lm.model.embed_tokens.output.save()
    weight = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).model.embed_tokens.weight
    assert torch.equal(rows.value[0], weight[ids[0]])  # exactly what the policy opts in to


# --- model state and `.inputs` --------------------------------------------------------


@pytest.mark.parametrize("name", ["cache", "position_embeddings", "position_ids", "use_cache"])
@pytest.mark.parametrize(("op", "extra"), [
    ("builtins.list", ()), ("builtins.tuple", ()), ("operator.getitem", (0,)), ("builtins.len", ()),
    ("builtins.dict", ()), ("builtins.sum", ()), ("Tensor.size", ()), ("builtins.getattr", ("shape",)),
    (None, ()),  # saved as it is
])
def test_inputs_give_away_nothing_but_the_input(lms: dict[str, LanguageModel], name: str, op: str | None,
                                                extra: tuple) -> None:
    """The KV cache (under transformers' current key, and every other keyword argument:
    rotary tables, positions, flags) cannot be read through `.inputs` of a readable block."""
    lm = lms["provider"]
    with pytest.raises(ExecutionError, match=r"model state|keeps opaque") as info:
        with lm.generate("abcd", max_new_tokens=2, remote=True) as tracer:
            _, kwargs = lm.model.layers[1].inputs
            where = line(1)
            (kwargs[name] if op is None else tracer.record(op, (kwargs[name], *extra))).save()
    assert info.value.where == where


def test_inputs_show_the_input_of_a_block_and_of_a_keyword_called_module(
        lms: dict[str, LanguageModel], tiny_dir: Path) -> None:
    local = LanguageModel(str(tiny_dir), name="local")
    lm = lms["hidden"]
    with lm.trace("abcd", remote=True):
        args, _ = lm.model.layers[1].inputs
        block = args[0].save()
        _, kwargs = lm.model.layers[1].self_attn.inputs  # transformers passes hidden_states by keyword
        attn = kwargs["hidden_states"].save()
    with local.trace("abcd"):
        ref_block = local.model.layers[1].input.save()
        ref_attn = local.model.layers[1].self_attn.input.save()
    assert torch.equal(block.value, ref_block.value) and torch.equal(attn.value, ref_attn.value)


def test_the_server_still_serves(server: Any, key: str) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json()["models"]["provider"] == "ready"


def test_a_hidden_model_takes_jobs_only_once_its_lookups_are_known(tiny_dir: Path, tmp_path: Path) -> None:
    """Before a replica has loaded the weights, nobody knows which sites are lookups of
    them: a weights-hidden model answers "try again" (503), it never guesses."""
    from nnglass.errors import UnavailableError
    from nnglass.graph import wire
    from nnglass.server.config import ModelConfig, ServerConfig
    from nnglass.server.service import Service

    models = [ModelConfig(name=n, source=str(tiny_dir), policy=p) for n, p in
              (("provider", PROVIDER), ("open", Policy()), ("exposed", EXPOSED))]
    service = Service(ServerConfig(home=tmp_path, models=models))  # not started: no worker yet
    local = LanguageModel(str(tiny_dir), name="provider", backend=nnglass.Recorder())
    for name in ("provider", "open", "exposed"):
        with local.trace("abcd", remote=True) as tracer:  # recorded, never run
            tracer.graph.model = name
            local.model.layers[1].output.save()
        json_bytes, tensors = wire.encode(tracer.graph)
        if name == "provider":
            with pytest.raises(UnavailableError, match="still loading"):
                service.submit("k", json_bytes, tensors)
        else:
            assert service.submit("k", json_bytes, tensors).status.value == "QUEUED"
