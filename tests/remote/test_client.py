"""The remote client against an in-memory fake of the service's HTTP API (docs/service.md).

The fake decodes what the client sends with `graph.wire.decode` (as a server must), runs
the graph on its own copy of the model through the local runtime, and answers with
`graph.results.encode_results`: so "remote values equal local values" is checked
against an independent local run, bit for bit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from nnglass import errors
from nnglass.graph import wire
from nnglass.graph.ir import Graph, Invoke, Node, Site
from nnglass.graph.results import encode_results
from nnglass.models.nnmodel import NNModel
from nnglass.remote.client import Job, RemoteBackend
from nnglass.remote.status import StatusLine, bar, describe

KEY = "secret-key"
HOST = "http://fake.nnglass:8321"
DONE = [{"status": "QUEUED", "position": 2}, {"status": "QUEUED", "position": 1},
        {"status": "RUNNING"}, {"status": "COMPLETED"}]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _multipart(request: httpx.Request) -> dict[str, tuple[str, bytes]]:
    """Parts of a multipart/form-data body: name -> (content type, bytes), byte-exact."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(h.split(": ", 1) for h in head.decode().split("\r\n"))
        name = headers["Content-Disposition"].split('name="')[1].split('"')[0]
        parts[name] = (headers.get("Content-Type", ""), body[:-2])
    return parts


class FakeServer:
    """The HTTP API in memory. Each job walks `script`; GET advances one step, the event
    stream sends the rest at once."""

    def __init__(self, model: nn.Module | None = None, script: list[dict] | None = None) -> None:
        self.model = NNModel(model) if model is not None else None
        self.script = script if script is not None else DONE
        self.jobs: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str]] = []
        self.submitted: list[tuple[str, dict[str, tuple[str, bytes]]]] = []
        self.events: str = "ok"  # ok | raise | 503 | cut
        self.refuse: dict[str, tuple[int, Any, dict[str, str]]] = {}  # "POST /v1/jobs" -> answer
        self.error: Callable[[Graph], dict] | None = None  # the job ends in ERROR with this
        self.outage: list[str] = []  # how the next status reads fail: "503" or "refused"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        self.log.append((method, path))
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "invalid or missing API key"})
        for route, (code, detail, headers) in self.refuse.items():
            if f"{method} {path}".startswith(route):
                return httpx.Response(code, json={"detail": detail}, headers=headers)
        if (method, path) == ("POST", "/v1/jobs"):
            return self.submit(request)
        parts = path.split("/")  # "", "v1", "jobs", id, [what]
        job = self.jobs.get(parts[3])
        if job is None:
            return httpx.Response(404, json={"detail": "no such job"})
        what = parts[4] if len(parts) > 4 else ""
        if method == "DELETE":
            job["script"] = [{"status": "CANCELLED"}]
            job["at"] = 0
            return httpx.Response(200, json=self.info(job))
        if what == "events":
            return self.stream(job)
        if what == "result":
            return httpx.Response(200, content=job["result"],
                                  headers={"Content-Type": "application/octet-stream"})
        if self.outage:
            if self.outage.pop(0) == "refused":
                raise httpx.ConnectError("connection refused")
            return httpx.Response(503, text="restarting")
        job["at"] = min(job["at"] + 1, len(job["script"]) - 1)
        return httpx.Response(200, json=self.info(job))

    def submit(self, request: httpx.Request) -> httpx.Response:
        kind = request.headers["content-type"].split(";")[0]
        if kind == "multipart/form-data":
            parts = _multipart(request)
            graph = wire.decode(parts["graph"][1], parts["tensors"][1])
        else:
            parts = {"graph": (kind, request.content)}
            graph = wire.decode(request.content)
        self.submitted.append((kind, parts))
        job_id = f"job{len(self.jobs)}"
        script = list(self.script)
        if self.error is not None:
            script[-1] = {"status": "ERROR", "error": self.error(graph)}
        job = {"id": job_id, "script": script, "at": -1, "result": b""}
        if self.model is not None and self.error is None:
            values = self.model.run_graph(graph)
            job["result"] = encode_results(values, session=graph.mode == "session")
        self.jobs[job_id] = job
        return httpx.Response(202, json={"id": job_id, "status": "RECEIVED"})

    def info(self, job: dict) -> dict:
        return {"id": job["id"], "created_at": "2026-01-01T00:00:00Z", **job["script"][max(job["at"], 0)]}

    def stream(self, job: dict) -> httpx.Response:
        if self.events == "raise":
            raise httpx.ReadError("connection reset by peer")
        if self.events == "503":
            return httpx.Response(503, text="events unavailable")
        rest = job["script"][job["at"] + 1 :] or job["script"][-1:]
        if self.events == "cut":
            rest = rest[:1]
        job["at"] += len(rest)
        body = "".join(f": keepalive\nevent: status\ndata: {json.dumps({'id': job['id'], **s})}\n\n"
                       for s in rest)
        return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def backend(server: FakeServer, **kwargs: Any) -> RemoteBackend:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("progress", False)
    return RemoteBackend(HOST, transport=httpx.MockTransport(server), poll=(0.001, 0.01), **kwargs)


def remote_model(module: nn.Module, rb: RemoteBackend) -> NNModel:
    return NNModel(module, backend=rb)


def local_reference(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden: list[torch.Tensor] = []
    handle = module.a.register_forward_hook(lambda m, i, o: hidden.append(o.detach().clone()))
    with torch.no_grad():
        out = module(x)
    handle.remove()
    return hidden[0], out


# --- submitting --------------------------------------------------------------------------


def test_submit_sends_graph_and_tensors_as_multipart_with_bearer_key(net: nn.Module) -> None:
    server = FakeServer(net)
    model = remote_model(net, backend(server))
    x = torch.randn(2, 4)
    with model.trace(x, remote=True) as tracer:
        model.a.output.save()
    kind, parts = server.submitted[0]
    assert kind == "multipart/form-data"
    assert parts["graph"][0] == "application/json"
    assert parts["tensors"][0] == "application/octet-stream"
    assert (parts["graph"][1], parts["tensors"][1]) == wire.encode(tracer.graph)
    assert server.log[0] == ("POST", "/v1/jobs")


def test_a_graph_without_tensors_travels_as_plain_json() -> None:
    server = FakeServer(script=[{"status": "COMPLETED"}])
    graph = Graph(model="Net", invokes=[Invoke((3,))],
                  nodes=[Node(0, "get", site=Site("", "output"), save=True, where="exp.py:1")])
    job = backend(server).submit(graph)
    assert isinstance(job, Job) and job.id == "job0"
    assert server.submitted[0] == ("application/json", {"graph": ("application/json", wire.encode(graph)[0])})


# --- values ------------------------------------------------------------------------------


def test_blocking_trace_returns_values_identical_to_a_local_run(net: nn.Module) -> None:
    server = FakeServer(Net())
    server.model.module.load_state_dict(net.state_dict())
    model = remote_model(net, backend(server))
    x = torch.randn(3, 4)
    with model.trace(x, remote=True):
        h = model.a.output.save()
        y = model.output.save()
    ref_h, ref_y = local_reference(net, x)
    assert torch.equal(h.value, ref_h) and torch.equal(y.value, ref_y)
    polls = [p for m, p in server.log if m == "GET" and p == "/v1/jobs/job0"]
    assert polls == [] and ("GET", "/v1/jobs/job0/events") in server.log  # followed the stream


def test_remote_session_returns_each_traces_values(net: nn.Module) -> None:
    server = FakeServer(net)
    model = remote_model(net, backend(server))
    x1, x2 = torch.randn(1, 4), torch.randn(1, 4)
    with model.session(remote=True):
        with model.trace(x1, remote=True):
            h = model.a.output
        with model.trace(x2, remote=True):
            model.a.output = h
            y = model.output.save()
    ref_h, _ = local_reference(net, x1)
    assert torch.equal(y.value, net.b(torch.relu(ref_h)).detach())


def test_polling_takes_over_when_the_event_stream_fails(net: nn.Module) -> None:
    for mode in ("raise", "503", "cut"):
        server = FakeServer(net)
        server.events = mode
        model = remote_model(net, backend(server))
        x = torch.randn(2, 4)
        with model.trace(x, remote=True):
            y = model.output.save()
        assert torch.equal(y.value, local_reference(net, x)[1]), mode
        assert ("GET", "/v1/jobs/job0") in server.log, mode


def test_polling_rides_out_a_server_restart(net: nn.Module) -> None:
    server = FakeServer(net)
    server.events, server.outage = "raise", ["refused", "503", "refused"]
    model = remote_model(net, backend(server))
    x = torch.randn(2, 4)
    with model.trace(x, remote=True):
        y = model.output.save()
    assert torch.equal(y.value, local_reference(net, x)[1]) and server.outage == []


def test_polling_gives_up_after_its_patience() -> None:
    server = FakeServer()
    server.events, server.outage = "raise", ["refused"] * 1000
    rb = backend(server)
    rb.patience = 0.02
    job = rb.submit(Graph(model="Net", invokes=[Invoke((3,))]))
    with pytest.raises(errors.RemoteError, match=f"cannot reach the nnglass server at {HOST}"):
        job.wait()


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["TraceError", "GraphError", "VersionError", "ExecutionError",
                                       "OutOfOrderError", "TimeLimitError", "PolicyError",
                                       "RemoteError", "KeyError"])
def test_a_failed_job_raises_the_matching_class_at_the_users_line(net: nn.Module, type_name: str) -> None:
    server = FakeServer(net)
    server.error = lambda g: {"message": "shape mismatch in add", "where": g.nodes[-1].where,
                              "type": type_name}
    model = remote_model(net, backend(server))
    with pytest.raises(errors.NNglassError) as info:
        with model.trace(torch.randn(1, 4), remote=True):
            model.a.output.save(); line = f"{__file__}:{_line()}"  # noqa: E702
    expected = getattr(errors, type_name, errors.RemoteError)
    assert type(info.value) is expected
    assert info.value.message == "shape mismatch in add"
    assert info.value.where == line and str(info.value).endswith(f"at {line}")


def _line() -> int:
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def test_a_422_at_submit_raises_the_policy_error_with_its_line(net: nn.Module) -> None:
    server = FakeServer(net)
    detail = {"message": "module a may not be written", "where": "exp.py:7", "type": "PolicyError"}
    server.refuse["POST /v1/jobs"] = (422, detail, {})
    model = remote_model(net, backend(server))
    with pytest.raises(errors.PolicyError, match="may not be written") as info:
        with model.trace(torch.randn(1, 4), remote=True):
            model.a.output = 0
    assert info.value.where == "exp.py:7"


@pytest.mark.parametrize(("code", "cls", "words"), [
    (400, errors.RemoteError, ["400", "could not read"]),
    (404, errors.RemoteError, ["404", "model 'Net'", "/v1/models"]),
    (409, errors.VersionError, ["409", "wire version 2.0", "matching nnglass"]),
    (413, errors.RemoteError, ["413", "too large"]),
    (429, errors.RemoteError, ["429", "wait 30 s"]),
    (500, errors.RemoteError, ["500", "server failed"]),
])
def test_refusals_name_the_status_and_what_to_do(net: nn.Module, code: int, cls: type, words: list) -> None:
    server = FakeServer(net)
    detail = {"message": "wire version 2.0 is not 1.0", "type": "VersionError"} if code == 409 else "no"
    server.refuse["POST /v1/jobs"] = (code, detail, {"Retry-After": "30"})
    model = remote_model(net, backend(server))
    with pytest.raises(cls) as info:
        with model.trace(torch.randn(1, 4), remote=True):
            model.output.save()
    assert type(info.value) is cls and HOST in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_busy_server_is_asked_again_after_its_retry_after(net: nn.Module) -> None:
    """503 + Retry-After (the database busy or away; nothing kept): the client waits as told
    and sends the same request again, and the run's values are the local run's."""
    server = FakeServer(net)
    server.refuse["POST /v1/jobs"] = (503, {"message": "database busy"}, {"Retry-After": "1"})
    refused = server.__call__

    def once_busy(request: httpx.Request) -> httpx.Response:
        answer = refused(request)
        server.refuse.clear()  # busy once, then well again
        return answer

    rb = RemoteBackend(HOST, api_key=KEY, progress=False, transport=httpx.MockTransport(once_busy),
                       poll=(0.001, 0.01))
    x = torch.randn(2, 4)
    model = remote_model(net, rb)
    with model.trace(x, remote=True):
        out = model.output.save()
    assert [r for r in server.log if r == ("POST", "/v1/jobs")] == [("POST", "/v1/jobs")] * 2
    assert torch.equal(out.value, local_reference(net, x)[1])


def test_a_server_busy_past_the_clients_patience_is_a_remote_error(net: nn.Module) -> None:
    server = FakeServer(net)
    server.refuse["POST /v1/jobs"] = (503, {"message": "database busy"}, {"Retry-After": "1"})
    rb = backend(server)
    rb.patience = 0.5  # less than one wait: refused at once, asked never again
    model = remote_model(net, rb)
    with pytest.raises(errors.RemoteError, match="503") as info:
        with model.trace(torch.randn(1, 4), remote=True):
            model.output.save()
    assert "database busy" in str(info.value)
    assert server.log.count(("POST", "/v1/jobs")) == 1


@pytest.mark.parametrize("key", ["wrong", ""])
def test_a_bad_or_missing_key_says_to_set_nnglass_api_key(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.delenv("NNGLASS_API_KEY", raising=False)
    rb = backend(FakeServer(), api_key=key)
    with pytest.raises(errors.RemoteError, match="401") as info:
        rb.job("job0").status()
    assert "NNGLASS_API_KEY" in str(info.value)
    assert ("no API key is set" in str(info.value)) == (key == "")


def test_an_unknown_job_is_a_404_naming_it() -> None:
    with pytest.raises(errors.RemoteError, match=r"404 for job nope: no such job; job nope is not there"):
        backend(FakeServer()).job("nope").wait()


def test_a_refused_connection_names_the_host() -> None:
    rb = RemoteBackend("127.0.0.1:1", api_key=KEY, progress=False, timeout=5)
    with pytest.raises(errors.RemoteError, match=r"cannot reach the nnglass server at http://127\.0\.0\.1:1"):
        rb.job("job0").status()


# --- non-blocking jobs -------------------------------------------------------------------


def test_non_blocking_job_fills_saved_proxies_on_wait(net: nn.Module) -> None:
    server = FakeServer(net)
    model = remote_model(net, backend(server))
    x = torch.randn(2, 4)
    with model.trace(x, remote=True, blocking=False) as tracer:
        h = model.a.output.save()
    job = tracer.job
    assert isinstance(job, Job) and server.log == [("POST", "/v1/jobs")]  # submitted, not awaited
    with pytest.raises(errors.TraceError):
        h.value  # noqa: B018
    assert job.status() == "QUEUED" and job.info["position"] == 2
    seen: list[dict] = []
    job.on_done(seen.append)
    job.wait()
    assert torch.equal(h.value, local_reference(net, x)[0])
    assert seen == [job.result()] and job.status() == "COMPLETED"
    job.wait()  # again: nothing downloads twice
    assert server.log.count(("GET", "/v1/jobs/job0/result")) == 1
    late: list[dict] = []
    job.on_done(late.append)
    assert late == seen


def test_submit_returns_at_once() -> None:
    server = FakeServer()
    rb = backend(server)
    graph = Graph(model="Net", invokes=[Invoke((3,))], nodes=[Node(0, "get", site=Site("", "output"))])
    job = rb.submit(graph)
    assert job.id == "job0" and server.log == [("POST", "/v1/jobs")]


def test_cancel_then_wait_raises() -> None:
    server = FakeServer()
    rb = backend(server)
    graph = Graph(model="Net", invokes=[Invoke((3,))], nodes=[Node(0, "get", site=Site("", "output"))])
    job = rb.submit(graph)
    assert job.cancel() == "CANCELLED"
    assert ("DELETE", "/v1/jobs/job0") in server.log
    with pytest.raises(errors.RemoteError, match="job0 was cancelled"):
        job.wait()
    assert job.status() == "CANCELLED"


def test_wait_with_a_timeout_gives_up_on_a_job_that_keeps_running() -> None:
    server = FakeServer(script=[{"status": "RUNNING"}])
    server.events = "cut"
    job = backend(server).submit(Graph(model="Net", invokes=[Invoke((3,))]))
    with pytest.raises(errors.RemoteError, match=r"still RUNNING after 0\.05 s"):
        job.wait(timeout=0.05)


def test_ctrl_c_while_waiting_cancels_the_job(net: nn.Module) -> None:
    server = FakeServer(net)
    model = remote_model(net, backend(server))

    def interrupted(job: dict) -> httpx.Response:
        raise KeyboardInterrupt

    server.stream = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt), model.trace(torch.randn(1, 4), remote=True):
        model.output.save()
    assert ("DELETE", "/v1/jobs/job0") in server.log


# --- the status line ---------------------------------------------------------------------


def test_progress_forced_shows_queue_running_and_download_then_clears(
        net: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    model = remote_model(net, backend(FakeServer(net), progress=True))
    with model.trace(torch.randn(1, 4), remote=True):
        model.output.save()
    err = capsys.readouterr().err
    for text in ["nnglass: queued (position 2)", "queued (position 1)", "running", "downloading 0.0/0.0 MB"]:
        assert text in err
    assert err.endswith("\r") and err.rsplit("\r", 2)[-2].strip() == ""  # the line is erased


@pytest.mark.parametrize("progress", [False, None])  # None: only on a terminal; captured stderr is not
def test_no_progress_unless_asked_or_on_a_terminal(net: nn.Module, progress: bool | None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = remote_model(net, backend(FakeServer(net), progress=progress))
    with model.trace(torch.randn(1, 4), remote=True):
        model.output.save()
    assert capsys.readouterr().err == ""


def test_status_line_texts() -> None:
    assert describe({"status": "QUEUED", "position": 3}) == "queued (position 3)"
    assert describe({"status": "RUNNING"}) == "running"
    assert bar(12_300_000, 40_000_000, width=10) == "downloading 12.3/40.0 MB [###       ]"
    assert bar(5_000_000, None) == "downloading 5.0 MB"
    out = io.StringIO()
    line = StatusLine(True, out)
    line.show("running")
    line.show("running")  # unchanged: not rewritten
    line.show("ok")
    line.clear()
    assert out.getvalue() == "\rnnglass: running\rnnglass: ok     " + "\r" + " " * 11 + "\r"


def test_in_a_notebook_progress_renders_in_one_output_area(
        net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a Jupyter kernel the status is one display area updated in place: queued at N,
    running, downloading with a bar, then emptied; `progress=False` shows nothing."""
    import sys
    import types

    shown: list[str] = []

    class Handle:
        def update(self, bundle: dict, raw: bool = False) -> None:
            shown.append(bundle["text/html"])

    def display(bundle: dict, raw: bool = False, display_id: bool = False) -> Handle:
        assert raw and display_id
        shown.append(bundle["text/html"])
        return Handle()

    ipython = types.ModuleType("IPython")
    ipython.display = types.SimpleNamespace(display=display)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython.display)  # type: ignore[attr-defined]
    model = remote_model(net, backend(FakeServer(net), progress=None))
    x = torch.randn(1, 4)
    with model.trace(x, remote=True):
        y = model.output.save()
    assert torch.equal(y.value, local_reference(net, x)[1])
    assert shown[0] == "<code>nnglass: queued (position 2)</code>"
    assert "<code>nnglass: running</code>" in shown
    assert any("<progress" in h and "downloading" in h for h in shown)
    assert shown[-1] == ""
    shown.clear()
    quiet = remote_model(net, backend(FakeServer(net), progress=False))
    with quiet.trace(torch.randn(1, 4), remote=True):
        quiet.output.save()
    assert shown == []
