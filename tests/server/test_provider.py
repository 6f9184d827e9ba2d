"""The OpenAI-compatible endpoints, called with the official `openai` client against a real
server, each answer checked against the same computation done without the server: plain
transformers `generate` and forward passes, plain PyTorch hooks, or a local nnglass trace.

One model on one server (tests/server/provider_fixtures.py): "provider", the tests' tiny
Llama with a chat template, under the shipped provider policy (weights hidden, reads and
writes limited to the blocks and the root's output): what the extensions do, and that
the policy holds, on the same model.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import transformers
from provider_fixtures import Provider

from nnglass import LanguageModel, NNglassError, PolicyError, TraceError
from nnglass.errors import MalformedError, QuotaError, UnavailableError
from nnglass.graph import wire
from nnglass.remote import RemoteBackend
from nnglass.runtime.backend import DoneJob
from nnglass.server.openai_api import openai_error
from nnglass.server.openai_graph import Frontend
from nnglass.server.openai_request import parse_request


@pytest.fixture(scope="session")
def server(provider: Provider) -> Any:
    return provider.server


@pytest.fixture(scope="session")
def key(provider: Provider) -> str:
    return provider.key


@pytest.fixture(scope="session")
def client(provider: Provider) -> openai.OpenAI:
    return provider.client


@pytest.fixture(scope="session")
def hf(tiny_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def tok(tiny_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def greedy(hf: Any, ids: list[int], n: int, hooks: dict[str, Any] | None = None) -> list[int]:
    """Plain transformers greedy generation; `hooks`: module path -> forward hook."""
    handles = [hf.get_submodule(p).register_forward_hook(h) for p, h in (hooks or {}).items()]
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    new = out[0, len(ids) :].tolist()
    return new[: new.index(1)] if 1 in new else new  # up to the end-of-sequence token


def array(entry: dict[str, Any]) -> torch.Tensor:
    raw = bytearray(base64.b64decode(entry["data"]))
    return torch.frombuffer(raw, dtype=getattr(torch, entry["dtype"])).reshape(entry["shape"])


def test_chat_equals_generate_token_for_token(client: openai.OpenAI, hf: Any, chat_dir: Path) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="provider", messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    tok = transformers.AutoTokenizer.from_pretrained(chat_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = greedy(hf, ids, 12)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert [e.token for e in r.choices[0].logprobs.content] == [tok.decode([t]) for t in want]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    # log-probs: the model's own distribution at each step
    with torch.no_grad():
        logits = hf(torch.tensor([ids + want])).logits[0, len(ids) - 1 : len(ids) + len(want) - 1]
    ref = logits.float().log_softmax(-1)
    got = torch.tensor([e.logprob for e in r.choices[0].logprobs.content])
    torch.testing.assert_close(got, ref[torch.arange(len(want)), torch.tensor(want)], rtol=0, atol=1e-5)
    top = [[a.logprob for a in e.top_logprobs] for e in r.choices[0].logprobs.content]
    torch.testing.assert_close(torch.tensor(top), ref.topk(3).values, rtol=0, atol=1e-5)


def test_streaming_reassembles_to_the_whole_answer(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "abc", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="provider", messages=messages, max_tokens=6, temperature=0)
    parts = client.chat.completions.create(model="provider", messages=messages, max_tokens=6, temperature=0,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == chat.choices[0].message.content


def test_completion_equals_generate_and_stop_cuts(client: openai.OpenAI, hf: Any, tok: Any) -> None:
    ids = tok("hello")["input_ids"]
    want = tok.decode(greedy(hf, ids, 16), skip_special_tokens=True)
    r = client.completions.create(model="provider", prompt="hello", max_tokens=16, temperature=0)
    assert r.choices[0].text == want
    assert len(want) > 3, "the random model should say something"
    stop = want[2:4]
    kw: dict[str, Any] = {"model": "provider", "prompt": "hello", "max_tokens": 16, "temperature": 0}
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == want[: want.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_the_local_seeded_generate(client: openai.OpenAI, tiny_dir: Path) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "xyz", "max_tokens": 8, "temperature": 0.9}
    kw["top_p"] = 0.8
    a = client.completions.create(**kw, seed=7).choices[0].text
    assert client.completions.create(**kw, seed=7).choices[0].text == a
    lm = LanguageModel(tiny_dir)
    with lm.generate(
        "xyz", max_new_tokens=8, seed=7, do_sample=True, temperature=0.9, top_p=0.8, top_k=0
    ) as tr:
        out = tr.result.save()
    new = out.value[0, 3:].tolist()
    assert a == lm.tokenizer.decode(new[: new.index(1)] if 1 in new else new, skip_special_tokens=True)


def test_steering_equals_the_same_trace_and_a_plain_hook(client: openai.OpenAI, tiny_dir: Path, hf: Any,
                                                         tok: Any) -> None:
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    steer = {"site": "model.layers.0", "vector": v.tolist(), "scale": 4.0, "positions": "all"}
    kw: dict[str, Any] = {"model": "provider", "prompt": "steer me", "max_tokens": 12, "temperature": 0}
    r = client.completions.create(**kw, extra_body={"nnglass": {"steer": [steer]}})
    plain = client.completions.create(**kw).choices[0].text
    lm = LanguageModel(tiny_dir)
    with lm.generate("steer me", max_new_tokens=12) as tr:
        with tr.all():
            lm.model.layers[0].output[:] += 4.0 * v
        out = tr.result.save()
    new = out.value[0, len("steer me") :].tolist()
    want = lm.tokenizer.decode(new[: new.index(1)] if 1 in new else new, skip_special_tokens=True)
    assert r.choices[0].text == want != plain
    # only the generated steps, as base64 float32: a plain hook that skips the prompt's pass
    b64 = base64.b64encode(v.numpy().tobytes()).decode()
    gen = {"site": "model.layers.1", "vector": b64, "scale": 3.0, "positions": "generated"}
    r = client.completions.create(**kw, extra_body={"nnglass": {"steer": [gen]}})
    seen = [0]

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        return output if seen[0] == 1 else output + 3.0 * v

    ids = tok("steer me")["input_ids"]
    assert r.choices[0].text == tok.decode(
        greedy(hf, ids, 12, {"model.layers.1": hook}), skip_special_tokens=True
    )


def test_read_equals_a_saved_trace_streamed_or_not(client: openai.OpenAI, tiny_dir: Path) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "read me", "max_tokens": 6, "temperature": 0,
                          "extra_body": {"nnglass": {"read": ["model.layers.*"]}}}
    r = client.completions.create(**kw)
    acts = r.nnglass["activations"]  # type: ignore[attr-defined]
    assert set(acts) == {"model.layers.0", "model.layers.1"}
    lm = LanguageModel(tiny_dir)
    with lm.generate("read me", max_new_tokens=6) as tr:
        with tr.all():
            saved = {p: lm._envoy.at(p).output[:, -1].save() for p in acts}
    n = r.usage.completion_tokens
    for path, entry in acts.items():
        torch.testing.assert_close(array(entry), torch.cat(saved[path].value)[:n], rtol=0, atol=1e-6)
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices and c.choices[0].text]
    for path in acts:
        rows = torch.cat([array(c.nnglass["activations"][path]) for c in chunks])  # type: ignore[attr-defined]
        assert torch.equal(rows, array(acts[path])[: len(rows)])


def test_graph_extension_runs_a_full_graph(client: openai.OpenAI, tiny_dir: Path) -> None:
    class Capture:
        def submit(self, graph: Any) -> Any:
            job = DoneJob({})
            job.graph = graph  # type: ignore[attr-defined]
            return job

    lm = LanguageModel(tiny_dir, name="provider", backend=Capture())
    with lm.generate("g", max_new_tokens=4, remote=True) as tr:
        with tr.step(1):
            lm.model.layers[0].output[:] *= 0.5
            kept = lm.model.layers[1].output[:, -1].norm().save()
    doc, tensors = wire.encode(tr.job.graph)  # type: ignore[union-attr]
    ext = {"graph": json.loads(doc), "graph_tensors": base64.b64encode(tensors or b"").decode()}
    r = client.completions.create(model="provider", prompt="g", max_tokens=4, temperature=0,
                                  extra_body={"nnglass": ext})
    local = LanguageModel(tiny_dir)
    with local.generate("g", max_new_tokens=4) as tr:
        with tr.step(1):
            local.model.layers[0].output[:] *= 0.5
            want = local.model.layers[1].output[:, -1].norm().save()
        out = tr.result.save()
    saved = r.nnglass["saved"][str(kept._id)]  # type: ignore[attr-defined]
    torch.testing.assert_close(array(saved), want.value, rtol=0, atol=1e-6)
    new = out.value[0, 1:].tolist()
    assert r.choices[0].text == local.tokenizer.decode(new[: new.index(1)] if 1 in new else new,
                                                       skip_special_tokens=True)


def test_provider_policy_holds_through_this_endpoint(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    ok = client.chat.completions.create(model="provider", messages=messages, max_tokens=3, temperature=0,
                                        extra_body={"nnglass": {"read": ["model.layers.1"]}})
    assert ok.nnglass["activations"]["model.layers.1"]["shape"][1] == 32  # type: ignore[attr-defined]
    refusals = [
        ({"read": ["model.embed_tokens"]}, "model.embed_tokens"),
        ({"read": ["model.layers.0.mlp"]}, "model.layers.0.mlp"),
        ({"steer": [{"site": "model.norm", "vector": [0.0] * 32}]}, "model.norm"),
    ]
    for ext, site in refusals:
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.chat.completions.create(model="provider", messages=messages, max_tokens=3,
                                           extra_body={"nnglass": ext})
        error = e.value.body
        assert (
            site in error["message"] and "policy" in error["message"] and error["code"] == "policy_forbidden"
        )
    with pytest.raises(openai.BadRequestError) as e:  # more tokens than the model allows
        client.chat.completions.create(model="provider", messages=messages, max_tokens=65)
    assert e.value.body["param"] == "max_tokens"


def test_errors_have_openai_shape_and_status(server: Any, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="provider", prompt="a")
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="a")
    assert "gpt-9" in e.value.body["message"] and e.value.body["code"] == "model_not_found"
    cases = [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        (
            {"extra_body": {"nnglass": {"steer": [{"site": "model.layers.0", "vector": [1.0]}]}}},
            "nnglass.steer[0].vector",
        ),
        ({"extra_body": {"nnglass": {"read": ["nothing.here"]}}}, "nnglass.read[0]"),
        (
            {"extra_body": {"nnglass": {"steer": [{"site": "model.layers.0", "vector": "!!"}]}}},
            "nnglass.steer[0].vector",
        ),
        ({"extra_body": {"nnglass": {"graph": {"version": 1}}}}, "nnglass.graph"),
    ]
    for kw, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "provider", "prompt": "a", **kw})
        assert e.value.body["message"].startswith(field), (kw, e.value.body)
    assert openai_error(QuotaError("too many")).status_code == 429
    assert json.loads(openai_error(UnavailableError("busy")).body)["error"]["type"] == "server_error"


def test_models_list_for_both_clients_and_jobs_are_ordinary(
    server: Any, key: str, client: openai.OpenAI
) -> None:
    assert [m.id for m in client.models.list()] == ["provider"]
    with server.client(key) as http:
        plain = http.get("/v1/models").json()
        assert isinstance(plain, list) and [m["name"] for m in plain] == ["provider"]
        before = server.metric(key, "nnglass_jobs_submitted_total")
        r = client.completions.create(model="provider", prompt="job", max_tokens=2)
        job = r.nnglass["job"]  # type: ignore[attr-defined]
        assert http.get(f"/v1/jobs/{job}").json()["status"] == "COMPLETED"
        assert job in [j["id"] for j in http.get("/v1/jobs").json()["jobs"]]
        assert server.metric(key, "nnglass_jobs_submitted_total") == before + 1
        # the meta route: config, tokenizer and tree; a key is required; no weights
        meta = http.get("/v1/models/provider/meta").json()
        assert "config.json" in meta["files"] and not any(
            f.endswith((".safetensors", ".bin")) for f in meta["files"]
        )
        assert httpx.get(f"{server.url}/v1/models/provider/meta").status_code == 401


# --- clients that have nothing local ---------------------------------------------------------


def test_remote_only_client_needs_nothing_local(server: Any, key: str, chat_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNGLASS_CACHE", str(tmp_path / "cache"))
    backend = RemoteBackend(server.url, key, progress=False)
    lm = LanguageModel("provider", remote=True, backend=backend)
    local = LanguageModel(chat_dir)
    assert repr(lm) == repr(local)  # the same module tree, built from the server's config
    cached = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert "config.json" in cached and not any(n.endswith((".safetensors", ".bin", ".pt")) for n in cached)
    with lm.scan("abc"):
        shape = lm.model.layers[0].output.save()
    assert tuple(shape.value.shape) == (1, 3, 32)
    with lm.generate("hi", max_new_tokens=4) as tr:  # remote: the default for this model
        h = lm.model.layers[1].output[:, -1].save()
        out = tr.result.save()
    with local.generate("hi", max_new_tokens=4) as tr:
        want_h = local.model.layers[1].output[:, -1].save()
        want = tr.result.save()
    assert torch.equal(out.value, want.value) and torch.equal(h.value, want_h.value)
    with pytest.raises(PolicyError) as e:
        with lm.trace("hi"):
            lm.model.embed_tokens.output.save()
    assert e.value.where.endswith(f"test_provider.py:{sys._getframe().f_lineno - 1}")
    with pytest.raises(TraceError, match="lives on the server"):
        lm.module  # noqa: B018
    with pytest.raises(NNglassError) as e:
        LanguageModel("no-such-model", remote=True, backend=backend)
    assert "neither locally nor on the server" in e.value.message and "404" in e.value.message


def test_chat_needs_a_chat_template(tiny_dir: Path) -> None:
    frontend = Frontend("tiny", str(tiny_dir))  # the char tokenizer has none
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}
    with pytest.raises(MalformedError, match="no chat template; use POST /v1/completions"):
        frontend.prompt_ids(parse_request(body, chat=True))
    assert openai_error(MalformedError("messages: no chat template")).status_code == 400


def test_concurrent_chats_run_as_generate_jobs_and_answer_as_alone(server: Any, key: str,
                                                                   client: openai.OpenAI) -> None:
    """OpenAI requests are ordinary generate jobs: sent at once they run in the continuous
    batch (a row of their own each, joining at step boundaries), token for token what each
    gets alone, log-probs within float tolerance."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [([{"role": "user", "content": "hi"}], 9, 0.0),
            ([{"role": "system", "content": "you are a much longer system prompt"},
              {"role": "user", "content": "tell me"}], 5, 0.0),
            ([{"role": "user", "content": "sampled, seeded"}], 7, 0.8)]

    def ask(a: Any) -> Any:
        messages, n, temperature = a
        return client.chat.completions.create(model="provider", messages=messages, max_tokens=n,
                                              temperature=temperature, seed=5, logprobs=True, top_logprobs=2)

    def steps() -> int:
        models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        return next(m for m in models if m["name"] == "provider")["batching"]["generation_steps"]

    alone = [ask(a) for a in asks]
    before = steps()
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    assert steps() > before  # they ran as generate jobs of the continuous batch
    for a, b in zip(alone, together):
        assert a.choices[0].message.content == b.choices[0].message.content
        got = torch.tensor([[t.logprob for t in e.top_logprobs] for e in b.choices[0].logprobs.content])
        want = torch.tensor([[t.logprob for t in e.top_logprobs] for e in a.choices[0].logprobs.content])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
