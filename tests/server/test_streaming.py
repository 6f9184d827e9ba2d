"""Per-token streaming, with the official `openai` client (and plain httpx where a test must
drop the connection) against the real embedded server of test_provider.py.

Each stream is checked against the same request not streamed: the same tokens, text,
log-probs and activations, exactly. That tokens are sent while the job generates is
shown without timing: the step gate (provider_fixtures.py) makes every generation step
wait, so a chunk received while it is held can only have come from a job still RUNNING.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import transformers
from provider_fixtures import Provider, held
from test_provider import array

from nnglass.graph.results import decode_results

READ = {"nnglass": {"read": ["model.layers.*"]}}


def token_chunks(chunks: list[Any]) -> list[Any]:
    """The chunks that carry a token (not the role, finish or usage chunks)."""
    return [c for c in chunks if c.choices and c.choices[0].finish_reason is None
            and (not hasattr(c.choices[0], "delta") or c.choices[0].delta.role is None)]


def status(provider: Provider, job: str) -> str:
    auth = {"Authorization": f"Bearer {provider.key}"}
    return httpx.get(f"{provider.server.url}/v1/jobs/{job}", headers=auth, timeout=30).json()["status"]


def generated(provider: Provider, answer: Any) -> list[int]:
    """An OpenAI answer's generated tokens, from its job's result (`tracer.result`, saved last)."""
    auth, job = {"Authorization": f"Bearer {provider.key}"}, answer.nnglass["job"]
    got = httpx.get(f"{provider.server.url}/v1/jobs/{job}/result", headers=auth, timeout=30)
    values = decode_results(got.raise_for_status().content)
    return values[max(values)][0, answer.usage.prompt_tokens:].tolist()


def test_a_completion_stream_is_the_whole_answer_token_by_token(provider: Provider) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "stream me", "max_tokens": 12, "temperature": 0,
                          "logprobs": 2, "extra_body": READ}
    whole = provider.client.completions.create(**kw)
    usage = {"include_usage": True}
    chunks = list(provider.client.completions.create(**kw, stream=True, stream_options=usage))
    parts = token_chunks(chunks)
    assert len(parts) == whole.usage.completion_tokens  # one chunk per token
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    lp = whole.choices[0].logprobs
    assert [t for c in parts for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [v for c in parts for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [v for c in parts for v in c.choices[0].logprobs.top_logprobs] == lp.top_logprobs
    assert [v for c in parts for v in c.choices[0].logprobs.text_offset] == lp.text_offset
    acts = whole.nnglass["activations"]  # type: ignore[attr-defined]
    for site in acts:
        rows = torch.cat([array(c.nnglass["activations"][site]) for c in parts])  # type: ignore[attr-defined]
        assert torch.equal(rows, array(acts[site]))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_a_chat_stream_is_the_whole_answer_token_by_token(provider: Provider) -> None:
    kw: dict[str, Any] = {"model": "provider", "messages": [{"role": "user", "content": "go on"}],
                          "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = provider.client.chat.completions.create(**kw)
    chunks = list(provider.client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    parts = token_chunks(chunks)
    assert "".join(c.choices[0].delta.content for c in parts) == whole.choices[0].message.content
    assert [e for c in parts for e in c.choices[0].logprobs.content] == whole.choices[0].logprobs.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_the_first_token_comes_while_the_job_still_runs(provider: Provider) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "slowly", "max_tokens": 8, "temperature": 0,
                          "extra_body": READ}
    whole = provider.client.completions.create(**kw)
    with held(provider):  # every step waits: the job cannot end while this holds
        stream = provider.client.completions.create(**kw, stream=True)
        first = next(iter(stream))
        job = first.nnglass["job"]  # type: ignore[attr-defined]
        assert status(provider, job) == "RUNNING"
        assert first.choices[0].finish_reason is None
        acts = first.nnglass["activations"]  # type: ignore[attr-defined]
        for site, entry in whole.nnglass["activations"].items():  # type: ignore[attr-defined]
            assert torch.equal(array(acts[site]), array(entry)[:1])  # token 0's row, already
    rest = list(stream)
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == whole.choices[0].text
    assert status(provider, job) == "COMPLETED"


def test_a_stop_split_across_tokens_cuts_the_stream_where_it_cuts_the_answer(provider: Provider) -> None:
    kw: dict[str, Any] = {"model": "provider", "prompt": "hello", "max_tokens": 16, "temperature": 0}
    want = provider.client.completions.create(**kw).choices[0]
    assert len(want.text) >= 5, "the random model should say something"
    stop = want.text[2:5]  # three tokens: one character each
    stopped = provider.client.completions.create(**kw, stop=[stop])
    cut = stopped.choices[0]
    chunks = list(provider.client.completions.create(**kw, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.text == want.text[: want.text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == cut.finish_reason == "stop"
    # The job stopped generating at the token that completed the stop string (one character
    # a token): no step more.
    assert len(generated(provider, stopped)) == stopped.usage.completion_tokens + len(stop) < 16
    never = want.text[2:4] + "\x7f"  # starts twice over, never completes (the vocabulary has no \x7f)
    chunks = list(provider.client.completions.create(**kw, stop=[never, stop[1:]], stream=True))
    cut = provider.client.completions.create(**kw, stop=[never, stop[1:]]).choices[0]
    assert "".join(c.choices[0].text for c in chunks) == cut.text == want.text[: want.text.index(stop[1:])]


def test_a_client_that_leaves_mid_stream_cancels_only_its_job(provider: Provider) -> None:
    """The job leaves its generation batch at the next step; the worker lives on, and a job
    generating beside it (joined at a step boundary) ends with its lone answer."""
    url, auth, server = provider.server.url, {"Authorization": f"Bearer {provider.key}"}, provider.server

    def metric(name: str) -> float:
        return server.metric(provider.key, f'nnglass_{name}{{model="provider"}}')

    body = {"model": "provider", "prompt": "leave", "max_tokens": 40, "temperature": 0, "stream": True}
    beside: dict[str, Any] = {"model": "provider", "prompt": "stay", "max_tokens": 30, "temperature": 0}
    lone = provider.client.completions.create(**beside)
    restarts = server.metric(provider.key, "nnglass_worker_restarts_total")
    pid = server.worker_pid("provider")
    with ThreadPoolExecutor(1) as pool, held(provider):  # (the gate goes before the pool waits)
        with httpx.stream("POST", f"{url}/v1/completions", headers=auth, json=body, timeout=30) as r:
            lines = r.iter_lines()  # (held: a dropped iterator would close the connection now)
            line = next(line for line in lines if line.startswith("data: "))
            job = json.loads(line.removeprefix("data: "))["nnglass"]["job"]
            assert status(provider, job) == "RUNNING"
            stays = pool.submit(provider.client.completions.create, **beside)
            _until(lambda: metric("queue_depth") == 1)
            provider.gate.unlink()  # a few steps: the next boundary admits it, then hold again
            _until(lambda: metric("running_jobs") == 2, pause=0.001)
            provider.gate.touch()
        _until(lambda: status(provider, job) == "CANCELLED")
    assert stays.result(timeout=60).choices[0].text == lone.choices[0].text
    assert len(lone.choices[0].text) > 0
    assert server.worker_pid("provider") == pid  # the job left its batch: no restart
    assert server.metric(provider.key, "nnglass_worker_restarts_total") == restarts


def _until(done: Any, timeout: float = 60, pause: float = 0.05) -> None:
    deadline = time.monotonic() + timeout  # a bound on the wait, not a measurement
    while not done():
        assert time.monotonic() < deadline
        time.sleep(pause)


def test_the_policy_holds_for_streams(provider: Provider) -> None:
    messages = [{"role": "user", "content": "hi"}]
    for ext, site in [({"read": ["model.embed_tokens"]}, "model.embed_tokens"),
                      ({"steer": [{"site": "model.norm", "vector": [0.0] * 32}]}, "model.norm")]:
        with pytest.raises(openai.PermissionDeniedError) as e:
            provider.client.chat.completions.create(model="provider", messages=messages, max_tokens=3,
                                                    stream=True, extra_body={"nnglass": ext})
        assert site in e.value.body["message"] and e.value.body["code"] == "policy_forbidden"


def test_a_native_job_streams_its_steps_through_its_events(provider: Provider, chat_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_dir)
    url, auth = provider.server.url, {"Authorization": f"Bearer {provider.key}"}
    kw: dict[str, Any] = {"model": "provider", "prompt": "native", "max_tokens": 6, "temperature": 0,
                          "extra_body": READ}
    whole = provider.client.completions.create(**kw)
    with held(provider):
        stream = provider.client.completions.create(**kw, stream=True)
        job = next(iter(stream)).nnglass["job"]  # type: ignore[attr-defined]
        with httpx.stream("GET", f"{url}/v1/jobs/{job}/events?steps=true", headers=auth, timeout=30) as r:
            lines = r.iter_lines()
            steps, statuses = [], []
            for line in lines:
                if line.startswith("event: step"):
                    steps.append(json.loads(next(lines).removeprefix("data: ")))
                elif line.startswith("data: "):
                    statuses.append(json.loads(line.removeprefix("data: "))["status"])
                    if statuses[-1] == "RUNNING" and provider.gate.exists():
                        provider.gate.unlink()  # seen running, with its first step: let it go on
                    if statuses[-1] in ("COMPLETED", "ERROR", "CANCELLED"):
                        break
    list(stream)
    assert statuses[-1] == "COMPLETED" and [s["step"] for s in steps] == list(range(len(steps)))
    n = whole.usage.completion_tokens
    tokens = [s["tokens"][0][0] for s in steps]  # one row, one new token a step
    assert tokenizer.decode(tokens[:n], skip_special_tokens=True) == whole.choices[0].text
    values = [decode_results(base64.b64decode(s["values"])) for s in steps]
    nodes = sorted(values[0])  # the read sites' nodes, in the order the sites were read
    acts = whole.nnglass["activations"]  # type: ignore[attr-defined]
    assert len(nodes) == len(acts)
    for node, site in zip(nodes, sorted(acts)):
        rows = torch.cat([v[node][0] for v in values])[:n]
        assert torch.equal(rows, array(acts[site]))
