"""The service end to end: `nnglass serve --config` on loopback (a random free port), its
worker subprocesses, the HTTP API of docs/service.md, and the client's `remote=True`.
The tests marked ON_BOTH_BACKENDS run again on the cluster combination (Ray actors on the
session's two-node cluster, PostgreSQL, S3: tests/server/conftest.py): the same answers,
bit for bit, events, positions, fairness, cancels, a shared pass, policy limits that only
the worker can see, isolation, a server restarted with jobs in flight, a worker process
killed mid-job. The rest (result expiry and time limits on a server of their own, the CLI
on SQLite) run on the embedded default; result expiry on S3 is in test_pg_transactions.py.

Remote runs are checked against the same experiment run in this process, bit for bit
(`torch.equal`). On one machine that holds when both sides use the same number of torch
threads (matrix libraries split their sums by thread): local references run with the
`threads` the server's config gives its models.

One server serves two models from the same tiny random Llama: `tiny` (everything
allowed) and `locked` (a restrictive policy). A second server gives `tiny` half a second
to run and results one second to live; restarts get a server of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

import nnglass
from nnglass import (
    ExecutionError,
    LanguageModel,
    NNglassError,
    PolicyError,
    RemoteError,
    TimeLimitError,
    _config,
)
from nnglass.graph.results import decode_results
from service_fixtures import (  # tests/service_fixtures.py
    ON_BOTH_BACKENDS,
    TERMINAL,
    post,
    recording,
    slow_graph,
    small_graph,
    submit,
    wait_for,
)

NAME, LOCKED = "tiny", "locked"


def locked_model(source: Path, threads: int) -> str:
    """Reads of whole blocks only, no writes, weights hidden, no gradients, no module
    calls, small limits."""
    return f"""
[[models]]
name = "{LOCKED}"
source = "{source}"
threads = {threads}

[models.policy]
read = ["model.layers.*"]
write = []
weights_visible = false
gradients = false
module_calls = false

[models.policy.limits]
prompt_tokens = 16
new_tokens = 2
graph_nodes = 40
result_bytes = 3000
run_seconds = 20
"""


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tiny_config: Callable[..., str],
           tiny_dir: Path, backend: Any) -> Iterator[Any]:
    """The module's server: the embedded default for every test, the cluster combination
    (Ray + PostgreSQL + S3) too for those marked ON_BOTH_BACKENDS (tests/server/conftest.py)."""
    text = tiny_config(extra_model=locked_model(tiny_dir, config_threads(tiny_config())))
    server = start_server("service", text, backend=backend)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def short(start_server: Callable[..., Any], tiny_config: Callable[..., str]) -> Iterator[Any]:
    """A server whose `tiny` may run half a second and whose results live one second."""
    text = tiny_config(run_seconds=0.5).replace("result_ttl_s = 3600", "result_ttl_s = 1")
    assert "result_ttl_s = 1\n" in text
    server = start_server("short", text)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server: Any) -> str:
    return server.keys.create("alice")[1]


@pytest.fixture(scope="module")
def http(server: Any, key: str) -> Iterator[httpx.Client]:
    with server.client(key) as client:
        yield client


def config_threads(config_text: str) -> int:
    """The torch threads a server config gives its (first) model."""
    found = re.search(r"^threads = (\d+)", config_text, re.MULTILINE)
    assert found, config_text
    return int(found[1])


@pytest.fixture(scope="module")
def lm(tiny_dir: Path, server: Any, key: str) -> Iterator[LanguageModel]:
    """The tiny model: `remote=True` goes to the module's server; local runs (the
    references) use the same weights with as many threads as the server's workers."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_config, "_overrides", {})
        nnglass.configure(host=server.url, api_key=key)
        torch.set_num_threads(config_threads(server.config.read_text()))
        try:
            yield LanguageModel(str(tiny_dir), name=NAME)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def locked(tiny_dir: Path, lm: LanguageModel) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=LOCKED)


# --- helpers ----------------------------------------------------------------------------


def line(offset: int = 0) -> str:
    """file:line of the caller's line plus `offset` (what a node made there records)."""
    frame = sys._getframe(1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno + offset}"


def assert_same(a: Any, b: Any) -> None:
    """Bitwise-equal trees of saved values; containers (and model outputs) keep their class."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    elif isinstance(a, dict):
        assert type(a) is type(b) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# --- 1. local and remote give the same numbers ------------------------------------------

TRUTH = "The truth is the"
STEER = torch.linspace(-1.0, 1.0, 32)


def getter_save(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.trace(TRUTH, remote=remote):
        h = lm.model.layers[0].output.save()
        mlp_in = lm.model.layers[1].mlp.input.save()
        out = lm.output.save()
    return {"h": h.value, "mlp_in": mlp_in.value, "out": out.value}


def inplace_setter(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.trace(TRUTH, remote=remote):
        lm.model.layers[0].output[:, 1] = 0
        h = lm.model.layers[0].output.save()
        logits = lm.output.logits.save()
    return {"h": h.value, "logits": logits.value}


def invokes(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.trace(remote=remote) as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of"):
            clean = lm.model.layers[0].output[:, -1]
            a = lm.lm_head.output[:, -1].save()
        with tracer.invoke("Rome is"):
            lm.model.layers[0].output[:, -1] = clean
            b = lm.lm_head.output[:, -1].save()
        with tracer.invoke():
            whole = lm.model.layers[1].output.save()
    return {"a": a.value, "b": b.value, "whole": whole.value}


def gradient(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.trace(TRUTH, remote=remote):
        h = lm.model.layers[0].output
        g = h.grad.save()
        lm.output.logits[0, -1].max().backward()
    return {"g": g.value}


def generation(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.generate("Once upon", max_new_tokens=4, remote=remote) as tracer:
        with tracer.all():
            lm.model.layers[0].output[:, -1] += STEER  # an attached tensor: a multipart request
            top = lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.step(2):
            h2 = lm.model.layers[1].output.save()
        tokens = tracer.result.save()
    return {"top": top.value, "h2": h2.value, "tokens": tokens.value}


def cache(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.trace(TRUTH, remote=remote) as tracer:
        entries = tracer.cache(modules=["model.layers.*"])
    assert sorted(entries) == ["model.layers.0", "model.layers.1"]
    return {path: entry.output.value for path, entry in entries.items()}


@ON_BOTH_BACKENDS
@pytest.mark.parametrize("experiment", [getter_save, inplace_setter, invokes, gradient, generation, cache],
                         ids=lambda f: f.__name__)
def test_remote_equals_local(lm: LanguageModel, experiment: Callable[..., dict[str, Any]]) -> None:
    remote = experiment(lm, True)
    local = experiment(lm, False)
    assert_same(remote, local)


@ON_BOTH_BACKENDS
def test_model_output_keeps_its_class(lm: LanguageModel) -> None:
    out = getter_save(lm, True)["out"]
    assert type(out) is CausalLMOutputWithPast
    assert out.logits.shape == (1, len(TRUTH), 100)


def session_experiment(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    with lm.session(remote=remote):
        with lm.trace("Paris is the capital of"):
            h = lm.model.layers[0].output[:, -1]
        with lm.trace("Rome is the capital of"):
            lm.model.layers[0].output[:, -1] = h
            out = lm.output.logits[:, -1].save()
        with pytest.raises(NNglassError):
            out.value  # noqa: B018  (nothing has run inside the session)
    return {"out": out.value}


def test_session_is_one_request(server: Any, key: str, lm: LanguageModel) -> None:
    before = server.metric(key, "nnglass_jobs_submitted_total")
    remote = session_experiment(lm, True)
    assert server.metric(key, "nnglass_jobs_submitted_total") == before + 1
    assert_same(remote, session_experiment(lm, False))


def test_models_count_the_real_prompt_tokens_they_ran(server: Any, key: str, http: httpx.Client,
                                                      lm: LanguageModel) -> None:
    """Padding is not counted: two invokes of 2 and 11 tokens are 13, however padded."""
    before = server.metric(key, "nnglass_prompt_tokens_total")
    with lm.trace(remote=True) as tracer:
        for prompt in ("hi", "hello there"):
            with tracer.invoke(prompt):
                lm.output.logits[:, -1].save()
    assert server.metric(key, "nnglass_prompt_tokens_total") == before + 13
    tiny = next(m for m in http.get("/v1/models").json() if m["name"] == NAME)
    assert tiny["prompt_tokens_per_s"] >= 13 / 60


def test_client_needs_no_weights(tiny_dir: Path, tmp_path: Path, lm: LanguageModel) -> None:
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    light = LanguageModel(str(tmp_path), name=NAME)  # config and tokenizer only
    assert_same(getter_save(light, True), getter_save(lm, False))


# --- 2. the API (docs/service.md) -------------------------------------------------------------


@ON_BOTH_BACKENDS
def test_submit_status_and_result(http: httpx.Client, lm: LanguageModel) -> None:
    graph = small_graph(lm, "hello")
    r = post(http, graph)
    assert r.status_code == 202
    info = r.json()
    assert info["status"] in ("QUEUED", "RUNNING", "COMPLETED")
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", info["id"])  # unguessable: 24 random bytes
    done = wait_for(http, info["id"])
    assert done["status"] == "COMPLETED" and done["id"] == info["id"] and "error" not in done
    assert done["created_at"] <= done["queued_at"] <= done["started_at"] <= done["finished_at"]

    first = http.get(f"/v1/jobs/{info['id']}/result")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/octet-stream"
    assert int(first.headers["content-length"]) == len(first.content) == done["result_bytes"]
    second = http.get(f"/v1/jobs/{info['id']}/result")  # re-downloadable until it expires
    assert second.status_code == 200 and second.content == first.content
    assert_same(decode_results(first.content), lm.run_graph(graph))


@ON_BOTH_BACKENDS
def test_events_positions_and_cancel(server: Any, key: str, http: httpx.Client, lm: LanguageModel) -> None:
    cancelled_before = server.metric(key, 'nnglass_jobs_finished_total{status="CANCELLED"}')
    busy = submit(http, slow_graph(lm))
    wait_for(http, busy, ("RUNNING", *TERMINAL))
    nxt = submit(http, small_graph(lm))
    last = submit(http, small_graph(lm))
    queued = [http.get(f"/v1/jobs/{j}").json() for j in (nxt, last)]
    assert [(q["status"], q["position"]) for q in queued] == [("QUEUED", 0), ("QUEUED", 1)]
    assert http.get("/v1/models").json()[0]["queue_depth"] == 2

    r = http.delete(f"/v1/jobs/{last}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"

    events: list[tuple[float, dict[str, Any]]] = []
    with http.stream("GET", f"/v1/jobs/{nxt}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for text in stream.iter_lines():  # ends when the server closes the stream
            if text.startswith("data:"):
                events.append((time.time(), json.loads(text[5:])))
    statuses = [e["status"] for _, e in events]
    assert [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]] == \
        ["QUEUED", "RUNNING", "COMPLETED"]
    assert events[0][1]["position"] == 0
    received, final = events[-1]
    assert received - final["finished_at"] < 2.0  # pushed (a poll would wait up to 15 s)

    assert wait_for(http, busy)["status"] == "COMPLETED"
    gone = http.get(f"/v1/jobs/{last}").json()
    assert gone["status"] == "CANCELLED" and gone["started_at"] is None  # it never ran
    assert http.get(f"/v1/jobs/{last}/result").status_code == 404
    assert server.metric(key, 'nnglass_jobs_finished_total{status="CANCELLED"}') == cancelled_before + 1


@ON_BOTH_BACKENDS
def test_queue_is_fair_across_keys(server: Any, http: httpx.Client, lm: LanguageModel) -> None:
    busy = submit(http, slow_graph(lm))
    wait_for(http, busy, ("RUNNING", *TERMINAL))
    mine = [submit(http, small_graph(lm)) for _ in range(3)]
    with server.client(server.keys.create("dave")[1]) as dave:
        theirs = submit(dave, small_graph(lm))
        assert dave.get(f"/v1/jobs/{theirs}").json()["position"] == 1  # after one of mine, not three
        done = wait_for(dave, theirs)
    starts = [wait_for(http, j)["started_at"] for j in mine]
    assert starts[0] < done["started_at"] < starts[1] < starts[2]


@ON_BOTH_BACKENDS
def test_a_cancel_in_a_shared_pass_removes_only_that_job(server: Any, key: str, http: httpx.Client,
                                                         lm: LanguageModel) -> None:
    """Four queued jobs of three widths share one pass (a slow one keeps it running); one of
    them is cancelled mid-pass: it ends CANCELLED with no result, the pass goes on (no
    worker restart), the others complete as they are alone (float tolerance: the batch's
    width differs). /v1/models and /metrics show the passes."""
    restarts = server.metric(key, "nnglass_worker_restarts_total")
    busy = submit(http, slow_graph(lm))  # the worker is busy: the jobs below queue
    wait_for(http, busy, ("RUNNING", *TERMINAL))
    slow = submit(http, slow_graph(lm))  # first of the next pass: keeps it running
    graphs = [small_graph(lm, p) for p in ("a longer prompt here", "yo")]
    ids = [submit(http, g) for g in graphs]
    doomed = submit(http, small_graph(lm, "cancel me"))
    assert wait_for(http, doomed, ("RUNNING", *TERMINAL))["status"] == "RUNNING"
    assert http.get(f"/v1/jobs/{slow}").json()["status"] == "RUNNING"  # the same pass
    r = http.delete(f"/v1/jobs/{doomed}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"
    for job, graph in zip(ids, graphs):
        assert wait_for(http, job)["status"] == "COMPLETED"
        remote = decode_results(http.get(f"/v1/jobs/{job}/result").content)
        for node_id, value in lm.run_graph(graph).items():
            torch.testing.assert_close(remote[node_id], value, atol=1e-4, rtol=1e-4)
    assert wait_for(http, slow)["status"] == "COMPLETED"
    assert wait_for(http, doomed)["status"] == "CANCELLED"
    assert http.get(f"/v1/jobs/{doomed}/result").status_code == 404
    assert server.metric(key, "nnglass_worker_restarts_total") == restarts
    batching = {m["name"]: m for m in http.get("/v1/models").json()}[NAME]["batching"]
    assert batching["share_jobs"] >= 4 and batching["share_tokens"] > 0 and batching["passes"] >= 2
    assert server.metric(key, f'nnglass_pass_jobs_bucket{{model="{NAME}",le="2"}}') < \
        server.metric(key, f'nnglass_pass_jobs_bucket{{model="{NAME}",le="4"}}')  # the pass of four


@ON_BOTH_BACKENDS
def test_error_status_names_the_line(http: httpx.Client, lm: LanguageModel) -> None:
    with lm.trace("hi", remote=True, blocking=False) as tracer:
        where = line(1)
        lm.model.layers[0].output[:, 50].save()
    info = wait_for(http, tracer.job.id)
    assert info["status"] == "ERROR" and info["finished_at"] is not None
    assert info["error"]["type"] == "ExecutionError"
    assert info["error"]["where"] == where and info["error"]["message"]
    assert http.get(f"/v1/jobs/{tracer.job.id}/result").status_code == 404


_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
PROMETHEUS = re.compile(rf"[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{_LABEL}(,{_LABEL})*\}})? "
                        r"[-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|[-+]Inf)")


@ON_BOTH_BACKENDS
def test_models_health_metrics_docs(server: Any, http: httpx.Client) -> None:
    models = {m["name"]: m for m in http.get("/v1/models").json()}
    assert sorted(models) == sorted([NAME, LOCKED])
    for m in models.values():
        assert m["state"] == "ready" and isinstance(m["queue_depth"], int)
    policy = models[LOCKED]["policy"]
    assert policy["read"] == ["model.layers.*"] and policy["write"] == []
    assert (policy["weights_visible"], policy["gradients"], policy["module_calls"]) == (False, False, False)
    assert policy["limits"]["new_tokens"] == 2 and models[NAME]["policy"]["limits"]["run_seconds"] == 20

    health = httpx.get(f"{server.url}/health")  # no key
    assert health.status_code == 200 and health.json()["status"] == "ok"

    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = [x for x in metrics.text.splitlines() if x and not x.startswith("#")]
    assert lines and all(PROMETHEUS.fullmatch(x) for x in lines), metrics.text
    assert f'nnglass_model_ready{{model="{NAME}"}} 1' in lines

    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/result",
                 "/v1/models", "/health", "/metrics"):
        assert path in paths
    assert "delete" in paths["/v1/jobs/{job_id}"] and "post" in paths["/v1/jobs"]


# --- 3. jobs outlive the server; results expire -----------------------------------------


@ON_BOTH_BACKENDS
def test_restart_keeps_every_job(start_server: Callable[..., Any], tiny_config: Callable[..., str],
                                 tmp_path_factory: pytest.TempPathFactory,
                                 lm: LanguageModel, backend: Any) -> None:
    """SIGKILL mid-job, then a new server on the same stores (the same home; on the
    cluster the same database and bucket, nothing else alive meanwhile: its dead lease
    hands the jobs over once it lapses, 10 s)."""
    home = tmp_path_factory.mktemp("restart")
    first = start_server("restart", tiny_config(), home=home, backend=backend)
    key = first.keys.create("r")[1]
    graph = small_graph(lm, "hello")
    with first.client(key) as http:
        running = submit(http, slow_graph(lm, k=4))
        wait_for(http, running, ("RUNNING",))
        queued = submit(http, graph)
        assert http.get(f"/v1/jobs/{queued}").json()["status"] == "QUEUED"
    first.kill()  # SIGKILL: no clean shutdown

    second = start_server("restart", tiny_config(), home=home, backend=backend, stores=first.stores)
    try:
        with second.client(key) as http:
            ends = {job: wait_for(http, job) for job in (running, queued)}
            for info in ends.values():
                assert info["status"] in ("COMPLETED", "ERROR"), info
                if info["status"] == "ERROR":
                    assert info["error"]["message"], info
            assert ends[queued]["status"] == "COMPLETED"
            result = http.get(f"/v1/jobs/{queued}/result")
            assert result.status_code == 200
            assert_same(decode_results(result.content), lm.run_graph(graph))
    finally:
        second.stop()


def test_results_expire(short: Any, lm: LanguageModel) -> None:
    key = short.keys.create("e")[1]
    with short.client(key) as http:
        job = submit(http, small_graph(lm))
        info = wait_for(http, job)
        assert http.get(f"/v1/jobs/{job}/result").status_code == 200
        assert info["expires_at"] == pytest.approx(info["finished_at"] + 1.0)
        deadline = time.monotonic() + 10
        while http.get(f"/v1/jobs/{job}/result").status_code != 404:
            assert time.monotonic() < deadline, "the result did not expire"
            time.sleep(0.2)
        assert http.get(f"/v1/jobs/{job}").json()["status"] == "COMPLETED"  # the record stays


# --- 4. policies ------------------------------------------------------------------------


def read_root_output(lm: LanguageModel) -> str:
    where = line(1)
    lm.output.logits.save()
    return where


def read_embeddings(lm: LanguageModel) -> str:
    where = line(1)
    lm.model.embed_tokens.output.save()
    return where


def edit_in_place(lm: LanguageModel) -> str:
    where = line(1)
    lm.model.layers[0].output[:, 0] = 0
    return where


def replace_output(lm: LanguageModel) -> str:
    h = lm.model.layers[1].output
    where = line(1)
    lm.model.layers[1].output = h * 2
    return where


def read_weight(lm: LanguageModel) -> str:
    where = line(1)
    lm.model.layers[0].mlp.down_proj.weight.save()
    return where


def read_buffer(lm: LanguageModel) -> str:
    where = line(1)
    lm.model.rotary_emb.inv_freq.save()
    return where


def take_gradient(lm: LanguageModel) -> str:
    h = lm.model.layers[0].output
    where = line(1)
    h.grad.save()
    lm.model.layers[1].output.sum().backward()
    return where


def backward(lm: LanguageModel) -> str:
    where = line(1)
    lm.model.layers[1].output.sum().backward()
    return where


def call_module(lm: LanguageModel) -> str:
    h = lm.model.layers[1].output
    where = line(1)
    lm.model.norm(h).save()
    return where


VIOLATIONS = [read_root_output, read_embeddings, edit_in_place, replace_output, read_weight, read_buffer,
              take_gradient, backward, call_module]


@pytest.mark.parametrize("violation", VIOLATIONS, ids=lambda f: f.__name__)
def test_policy_refuses_before_running(server: Any, key: str, locked: LanguageModel,
                                       violation: Callable[[LanguageModel], str]) -> None:
    before = server.metric(key, "nnglass_jobs_submitted_total")
    wheres = []
    with pytest.raises(PolicyError) as e:
        with locked.trace("hi", remote=True):
            wheres.append(violation(locked))
    assert e.value.where == wheres[0], e.value
    assert server.metric(key, "nnglass_jobs_submitted_total") == before  # refused, never queued


def test_policy_refusal_is_a_422(http: httpx.Client, locked: LanguageModel) -> None:
    with recording(locked.trace("hi")) as tracer:
        where = line(1)
        locked.model.embed_tokens.output.save()
    r = post(http, tracer.graph)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["type"] == "PolicyError" and detail["where"] == where
    assert "model.embed_tokens" in detail["message"] and "model.layers.*" in detail["message"]


@ON_BOTH_BACKENDS
def test_policy_limits(server: Any, key: str, locked: LanguageModel) -> None:
    before = server.metric(key, "nnglass_jobs_submitted_total")
    with pytest.raises(PolicyError, match="16"):
        with locked.trace("x" * 17, remote=True):
            locked.model.layers[0].output.save()
    with pytest.raises(PolicyError, match="max_new_tokens"):
        with locked.generate("hi", max_new_tokens=3, remote=True):
            locked.model.layers[0].output.save()
    with pytest.raises(PolicyError, match="nodes"):
        with locked.trace("hi", remote=True):
            h = locked.model.layers[0].output
            for _ in range(50):
                h = h + 1
            h.save()
    assert server.metric(key, "nnglass_jobs_submitted_total") == before
    # The result's size is known only after the run: the job ends as an ERROR naming the limit.
    with pytest.raises(PolicyError, match="3000"):
        with locked.trace("x" * 15, remote=True):
            locked.model.layers[0].output.save()
            locked.model.layers[1].output.save()


def test_policy_allows_what_it_allows(lm: LanguageModel, locked: LanguageModel) -> None:
    with locked.trace(TRUTH, remote=True):
        h = locked.model.layers[1].output.save()
    with lm.trace(TRUTH):
        ref = lm.model.layers[1].output.save()
    assert_same(h.value, ref.value)
    with locked.generate("hi", max_new_tokens=2, remote=True) as tracer:
        tokens = tracer.result.save()  # the generated ids are always readable
    with lm.generate("hi", max_new_tokens=2) as tracer:
        ref_tokens = tracer.result.save()
    assert_same(tokens.value, ref_tokens.value)


@ON_BOTH_BACKENDS
def test_jobs_never_change_the_shared_weights(lm: LanguageModel, tiny_dir: Path) -> None:
    for _ in range(2):  # setters, a backward pass, a refused in-place edit of a weight
        with lm.trace(TRUTH, remote=True):
            lm.model.layers[0].output[:] = 0
            lm.model.layers[1].mlp.down_proj.output = lm.model.layers[1].mlp.down_proj.output * 3
            lm.output.logits.sum().backward()
        gradient(lm, True)
    with pytest.raises(PolicyError, match="in place"):
        with lm.trace(TRUTH, remote=True):
            lm.model.layers[0].mlp.down_proj.weight.mul_(0)
    # Every parameter, read back from the worker, is bitwise what is on disk.
    on_disk = load_file(tiny_dir / "model.safetensors")
    with lm.trace("hi", remote=True):
        served = {n: getattr(lm.at(n.rpartition(".")[0]), n.rpartition(".")[2]).save() for n in on_disk}
    assert_same({n: p.value for n, p in served.items()}, on_disk)


# --- 5. isolation -----------------------------------------------------------------------


@ON_BOTH_BACKENDS
def test_one_jobs_error_leaves_others_alone(server: Any, lm: LanguageModel) -> None:
    other = server.keys.create("bob")[1]
    graph = small_graph(lm, "hello")
    with lm.trace("hi", remote=True, blocking=False) as bad:
        lm.model.layers[0].output[:, 50].save()
    with server.client(other) as bob:
        good = submit(bob, graph)
        with pytest.raises(ExecutionError):
            bad.job.wait()
        assert wait_for(bob, good)["status"] == "COMPLETED"
        assert_same(decode_results(bob.get(f"/v1/jobs/{good}/result").content), lm.run_graph(graph))


def test_time_limit_stops_the_run(short: Any, lm: LanguageModel) -> None:
    key = short.keys.create("t")[1]
    restarts = short.metric(key, "nnglass_worker_restarts_total")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_config, "_overrides", {})
        nnglass.configure(host=short.url, api_key=key)
        start = time.monotonic()
        with pytest.raises(TimeLimitError):
            with lm.generate("hi", max_new_tokens=30, remote=True) as tracer:
                with tracer.all():
                    m = lm.model.layers[0].output.sum().expand(1000, 1000).contiguous()
                    (m @ m @ m @ m).sum().save()  # ~0.1 s a step, 3 s in all
        assert time.monotonic() - start < 5.0  # stopped at the limit, not by the kill backstop
        assert short.metric(key, "nnglass_worker_restarts_total") == restarts  # inside a hook
        remote = getter_save(lm, True)  # the next job runs
    assert_same(remote, getter_save(lm, False))


@ON_BOTH_BACKENDS
def test_worker_crash_fails_only_its_job(server: Any, key: str, http: httpx.Client,
                                         lm: LanguageModel, backend: Any) -> None:
    """The worker's process SIGKILLed mid-job (as the out-of-memory killer does): the
    server's own child, or on the cluster the Ray actor's process on its node."""
    restarts = server.metric(key, "nnglass_worker_restarts_total")
    pid = server.worker_pid(NAME)
    stat = Path(f"/proc/{pid}/stat").read_text()
    parent = int(stat.rpartition(")")[2].split()[1])
    assert (parent == server.proc.pid) == (backend.name == "embedded")  # a raylet's child on Ray
    job = submit(http, slow_graph(lm))
    wait_for(http, job, ("RUNNING",))
    os.kill(pid, signal.SIGKILL)
    info = wait_for(http, job)
    assert info["status"] == "ERROR" and "crash" in info["error"]["message"], info
    assert_same(getter_save(lm, True), getter_save(lm, False))  # the next job runs
    assert server.metric(key, "nnglass_worker_restarts_total") == restarts + 1
    assert server.worker_pid(NAME) != pid


@ON_BOTH_BACKENDS
def test_cancel_a_running_job(http: httpx.Client, lm: LanguageModel) -> None:
    job = submit(http, slow_graph(lm))
    wait_for(http, job, ("RUNNING",))
    r = http.delete(f"/v1/jobs/{job}")
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"
    assert_same(getter_save(lm, True), getter_save(lm, False))  # the next job runs
    info = http.get(f"/v1/jobs/{job}").json()
    assert info["status"] == "CANCELLED" and "error" not in info
    assert http.get(f"/v1/jobs/{job}/result").status_code == 404


# --- 6. the client ----------------------------------------------------------------------


@ON_BOTH_BACKENDS
def test_non_blocking_job(http: httpx.Client, lm: LanguageModel) -> None:
    busy = submit(http, slow_graph(lm))  # so the jobs below wait in the queue
    with lm.trace(TRUTH, remote=True, blocking=False) as tracer:
        h = lm.model.layers[1].output.save()
    job = tracer.job
    assert isinstance(job.id, str) and job.status() in ("QUEUED", "RUNNING")
    with pytest.raises(NNglassError):
        h.value  # noqa: B018
    with lm.trace("hi", remote=True, blocking=False) as other:
        lm.model.layers[0].output.save()
    assert other.job.cancel() == "CANCELLED"
    with pytest.raises(RemoteError, match="cancelled"):
        other.job.wait()
    job.wait()
    assert job.status() == "COMPLETED"
    with lm.trace(TRUTH):
        ref = lm.model.layers[1].output.save()
    assert_same(h.value, ref.value)
    assert wait_for(http, busy)["status"] == "COMPLETED"


def test_server_errors_point_at_the_users_line(lm: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as e:
        with lm.trace("hi", remote=True):
            where = line(1)
            lm.model.layers[0].output[:, 50].save()
    assert e.value.where == where and where in str(e.value)


# --- 6b. operations inside a forward (`.source`) -------------------------------------------
# The served tiny Llama runs sdpa (transformers' default): its attention is one fused call.


def attention_call(lm: LanguageModel, remote: bool) -> dict[str, Any]:
    sdpa = lm.model.layers[1].self_attn.source.scaled_dot_product_attention_0
    with lm.trace(TRUTH, remote=remote):
        query = sdpa.input.save()
        heads = sdpa.output.save()
        sdpa.output[:, 0] = 0  # head 0 contributes nothing
        logits = lm.output.logits.save()
    return {"query": query.value, "heads": heads.value, "logits": logits.value}


def test_source_operations_remote_equal_local(lm: LanguageModel) -> None:
    remote, local = attention_call(lm, remote=True), attention_call(lm, remote=False)
    assert_same(remote, local)
    assert local["heads"].shape[1] == lm.config.num_attention_heads


def test_source_operations_outside_the_policy_are_refused(locked: LanguageModel) -> None:
    with pytest.raises(PolicyError) as e:
        with locked.trace("hi", remote=True):
            where = line(1)
            locked.model.layers[1].self_attn.source.scaled_dot_product_attention_0.output.save()
    assert e.value.where == where
    assert ("reading `model.layers.1.self_attn.source.scaled_dot_product_attention_0.output` is not allowed "
            "by the policy of model 'locked'; readable: 'model.layers.*'") in str(e.value)


def test_source_names_are_checked_against_the_loaded_model(http: httpx.Client, lm: LanguageModel) -> None:
    """A client may claim any name: the server checks it against the forward it loaded."""
    with recording(lm.trace(TRUTH)) as tracer:
        lm.model.layers[1].self_attn.source.scaled_dot_product_attention_0.output.save()
    graph = tracer.graph
    node = next(n for n in graph.nodes if n.site is not None)
    node.site = node.site._replace(path="model.layers.1.self_attn.source.softmax_0")
    r = post(http, graph)
    assert r.status_code == 422, r.text
    assert "makes no call 'softmax_0'" in r.text and "scaled_dot_product_attention_0" in r.text


def test_a_model_served_with_eager_attention_lists_its_softmax(tiny_dir: Path) -> None:
    """`attention = "eager"` reaches the worker: the probabilities become an operation."""
    from nnglass.server.worker import LoadedModel, ready_message

    threads = torch.get_num_threads()
    try:
        ready = ready_message(LoadedModel({"name": NAME, "source": str(tiny_dir), "threads": threads,
                                           "attention": "eager"}))
    finally:
        torch.set_num_threads(threads)
    assert "model.layers.1.self_attn.source.softmax_0" in ready["operations"]
    assert not any("scaled_dot_product" in p for p in ready["operations"])


# --- 7. the command line ----------------------------------------------------------------


def cli(home: Path, *args: str) -> str:
    env = {**os.environ, "NNGLASS_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "nnglass", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_keys(server: Any) -> None:
    made = cli(server.home, "keys", "create", "carol")
    key = made.strip().splitlines()[-1]
    assert re.fullmatch(r"nng_[A-Za-z0-9_-]{40,}", key), made
    stored = b"".join(p.read_bytes() for p in server.home.glob("nnglass.db*"))
    assert key.encode() not in stored  # only its hash is kept
    with server.client(key) as carol:
        assert carol.get("/v1/models").status_code == 200
        assert "revoked" in cli(server.home, "keys", "revoke", "carol")
        assert carol.get("/v1/models").status_code == 401
    listed = cli(server.home, "keys", "list")
    assert key not in listed
    rows = {x.split()[1]: x.split()[2] for x in listed.splitlines()}
    assert rows["alice"] == "active" and rows["carol"] == "revoked", listed
