"""The hostile client (docs/security.md): whatever it sends, the answer is a clear
4xx with the status code of docs/service.md's table, nothing it names is imported, run or read,
and the server keeps serving everyone else.

Requests go over plain HTTP (httpx) or, where httpx would tidy them up (dot segments in
paths, lying Content-Length headers), over a raw socket. A sentinel file sits outside the
server's home and every graph that tries to run a shell names a file that must never
appear. After the batch, a test checks that the server still serves a normal job and
wrote nothing outside its home (its working directory is an empty folder of its own); the
last one submits from one key in parallel, against its queue quota.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from nnglass import LanguageModel
from nnglass.graph import wire
from nnglass.graph.ir import WIRE_VERSION
from nnglass.graph.results import decode_results
from service_fixtures import ON_BOTH_BACKENDS, slow_graph, small_graph, wait_for  # tests/service_fixtures.py

NAME = "tiny"
SECRET = "the-sentinel-outside-home-" + secrets.token_hex(8)
Valid = tuple[dict[str, Any], bytes]  # a valid graph (as JSON data) and its tensors
pytestmark = ON_BOTH_BACKENDS  # every test: embedded, then the cluster (Ray + PostgreSQL + S3)


@dataclass
class Site:
    server: Any  # conftest.Server
    key: str  # alice: the owner of the jobs below
    base: Path  # the folder holding the server's home and everything else of this run
    cwd: Path  # the server's working directory: must stay empty
    sentinel: Path  # outside the home: must never be served
    touched: Path  # a file that a graph running a shell command would create
    before: dict[str, tuple[int, int]]  # what `base` held, outside the home, at the start


def listing(base: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under `base` but inside `skip`, with its size and modification time."""
    out = {}
    for p in base.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        st = p.lstat()
        out[str(p.relative_to(base))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def site(start_server: Callable[..., Any], tiny_config: Callable[..., str],
         tmp_path_factory: pytest.TempPathFactory, backend: Any) -> Iterator[Site]:
    """The server under attack, once per backend combination (conftest.backend)."""
    tiny_config()  # the tiny model is on disk before the listing below
    home = tmp_path_factory.mktemp("hostile-home")
    cwd = tmp_path_factory.mktemp("hostile-cwd")
    outside = tmp_path_factory.mktemp("hostile-outside")
    sentinel = outside / "secret.txt"
    sentinel.write_text(SECRET)
    base = tmp_path_factory.getbasetemp()
    before = listing(base, skip=home)
    server = start_server("hostile", tiny_config(), home=home, cwd=cwd, backend=backend)
    key = server.keys.create("alice")[1]
    yield Site(server, key, base, cwd, sentinel, outside / "touched", before)
    server.stop()


@pytest.fixture(scope="module")
def http(site: Site) -> Iterator[httpx.Client]:
    with site.server.client(site.key) as client:
        yield client


@pytest.fixture(scope="module")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=NAME)


@pytest.fixture(scope="module")
def valid(lm: LanguageModel) -> Valid:
    """A valid graph (as JSON data) and its tensors; tests edit copies of it."""
    graph_json, tensors = wire.encode(small_graph(lm))
    assert tensors is not None
    return json.loads(graph_json), tensors


def post(http: httpx.Client, graph: dict[str, Any] | bytes, tensors: bytes | None) -> httpx.Response:
    data = graph if isinstance(graph, bytes) else json.dumps(graph).encode()
    if tensors is None:
        return http.post("/v1/jobs", content=data, headers={"Content-Type": "application/json"})
    files = {"graph": ("graph.json", data, "application/json"),
             "tensors": ("t.safetensors", tensors, "application/octet-stream")}
    return http.post("/v1/jobs", files=files)


def edited(valid: Valid, **changes: Any) -> dict[str, Any]:
    graph = json.loads(json.dumps(valid[0]))
    graph.update(changes)
    return graph


def with_node(valid: Valid, op: str, *args: Any) -> dict[str, Any]:
    """The valid graph plus one saved node applying `op` to node 0 and `args`."""
    graph = edited(valid)
    node = {"id": len(graph["nodes"]), "op": op, "args": [{"$": "ref", "id": 0}, *args], "save": True,
            "where": "evil.py:1"}
    graph["nodes"].append(node)
    return graph


def refused(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """Assert a clear refusal: `status`, a JSON body naming the problem (and its type)."""
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, dict) and detail["message"], detail
    if kind is not None:
        assert detail["type"] == kind, detail
    return detail


def raw(server: Any, request: bytes, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send bytes as they are; (status, whole answer). None: the server closed silently."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n", 1)[0].split()
    return (int(head[1]) if len(head) > 1 else None), answer


def http_request(method: str, path: str, key: str | None, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body and "Content_Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- the body ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00garbage", b"", b"[]", b'"a string"', b"null",
                                  b'{"version": "1.0"}', b'{"version": "1.0", "model": "tiny", "nodes": 5}'],
                         ids=["syntax", "not-utf8", "empty", "array", "string", "null", "no-model",
                              "nodes-not-a-list"])
def test_malformed_json(http: httpx.Client, body: bytes) -> None:
    r = post(http, body, None)
    assert r.status_code in (400, 422), r.text
    refused(r, r.status_code)
    if body in (b"{not json", b"\xff\xfe\x00garbage", b""):
        refused(r, 400, "MalformedError")


def test_deep_nesting(http: httpx.Client, valid: Valid) -> None:
    deep = 10_000
    for body in (b"[" * deep + b"]" * deep, b'{"a":' * deep + b"1" + b"}" * deep):
        r = post(http, body, None)
        assert r.status_code in (400, 422)
        refused(r, r.status_code)
    # Nested inside an otherwise valid graph, in the multipart form the client uses.
    text = json.dumps(with_node(valid, "torch.add", "NEST"))
    body = text.replace('"NEST"', "[" * deep + "1" + "]" * deep).encode()
    refused(post(http, body, valid[1]), 422)


@pytest.mark.parametrize("op", ["torch.definitely_not_an_op", "os.system", "builtins.eval", "builtins.exec",
                                "__import__", "builtins.__import__", "builtins.open", "subprocess.run",
                                "pickle.loads", "torch.load", "torch.save", "torch.manual_seed",
                                "torch.set_num_threads", "torch.as_strided", "Tensor.set_",
                                "Tensor.untyped_storage", "Tensor.data_ptr", "Tensor.__reduce_ex__",
                                "builtins.getattr.__globals__", "operator.attrgetter", "sys.exit",
                                "Tensor.numpy", ""])
def test_ops_outside_the_registry(site: Site, http: httpx.Client, valid: Valid,
                                  op: str) -> None:
    graph = with_node(valid, op, f"touch {site.touched}")
    detail = refused(post(http, graph, valid[1]), 422, "GraphError")
    assert op in detail["message"]
    assert not site.touched.exists()


@pytest.mark.parametrize("name", ["__class__", "__dict__", "__globals__", "_modules", "grad_fn", "data",
                                  "storage", "__reduce__"])
def test_attribute_reads_outside_the_list(http: httpx.Client, valid: Valid,
                                          name: str) -> None:
    detail = refused(post(http, with_node(valid, "builtins.getattr", name), valid[1]), 422, "GraphError")
    assert name in detail["message"]


@pytest.mark.parametrize("value", [{"$": "dtype", "name": "os"}, {"$": "dtype", "name": "float32.__class__"},
                                   {"$": "pickle", "data": "gASV"}, {"$": "ref", "id": 99},
                                   {"$": "ref", "id": -1}, {"$": "tensor", "key": "../../etc/passwd"},
                                   {"$": "device", "name": "cuda:99; rm -rf /"}],
                         ids=["dtype-os", "dtype-attr", "pickle", "ref-later", "ref-negative",
                              "tensor-path", "device"])
def test_bad_values(http: httpx.Client, valid: Valid, value: dict[str, Any]) -> None:
    refused(post(http, with_node(valid, "torch.add", value), valid[1]), 422)


@pytest.mark.parametrize("version", ["2.0", "0.9", "1", "one", 2])
def test_wrong_version(http: httpx.Client, valid: Valid, version: Any) -> None:
    r = post(http, edited(valid, version=version), valid[1])
    if version in ("2.0", "0.9"):
        detail = refused(r, 409, "VersionError")
        assert version in detail["message"] and WIRE_VERSION.split(".")[0] + "." in detail["message"]
    else:
        assert r.status_code in (400, 409, 422)
        refused(r, r.status_code)


def test_unknown_model(http: httpx.Client, valid: Valid) -> None:
    detail = refused(post(http, edited(valid, model="gpt-17"), valid[1]), 404)
    assert "gpt-17" in detail["message"] and NAME in detail["message"]


# --- sizes and framing ------------------------------------------------------------------


def test_too_large(site: Site, http: httpx.Client, valid: Valid) -> None:
    limit = 8_000_000  # max_request_bytes in the test config
    big = b" " * (limit + 1)
    refused(post(http, b"{}" + big, None), 413, "TooLargeError")  # honest Content-Length
    refused(post(http, valid[0] | {"pad": "x" * limit}, valid[1]), 413)  # a huge multipart graph
    refused(post(http, valid[0], b"\0" * (limit + 1)), 413)  # a huge tensor part

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
        for _ in range(10):
            yield b" " * 1_000_000

    r = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    refused(r, 413)
    # A Content-Length that claims a huge body is refused before any of it is read.
    status, answer = raw(site.server, http_request("POST", "/v1/jobs", site.key, b"{}",
                                                   Content_Type="application/json",
                                                   Content_Length=str(10**12)))
    assert status == 413, answer


def test_tensor_header_lies(http: httpx.Client, valid: Valid) -> None:
    """A safetensors part whose header claims far more data than it holds, or is no header."""
    header = json.dumps({"t0": {"dtype": "I64", "shape": [100000, 100000], "data_offsets": [0, 16]},
                         "t1": {"dtype": "I64", "shape": [1, 2], "data_offsets": [16, 32]}}).encode()
    liar = len(header).to_bytes(8, "little") + header + b"\0" * 32
    for tensors in (liar, (2**60).to_bytes(8, "little") + b"{}", b"not safetensors at all"):
        r = post(http, valid[0], tensors)
        assert r.status_code in (400, 413, 422), r.text
        refused(r, r.status_code)


def test_a_huge_allocation_fails_only_its_job(site: Site, http: httpx.Client,
                                              valid: Valid) -> None:
    """A graph asking for a 4 TB tensor is refused or fails as its own ERROR; the worker lives."""
    restarts = site.server.metric(site.key, "nnglass_worker_restarts_total")
    graph = edited(valid)
    graph["nodes"].append({"id": 1, "op": "torch.ones", "args": [10**6, 10**6], "save": True,
                           "where": "x.py:1"})
    r = post(http, graph, valid[1])
    if r.status_code == 202:
        info = wait_for(http, r.json()["id"])
        assert info["status"] == "ERROR" and "limit" in info["error"]["message"], info  # refused, not tried
        assert info["error"]["where"] == "x.py:1"
    else:
        refused(r, r.status_code)
        assert 400 <= r.status_code < 500
    assert site.server.metric(site.key, "nnglass_worker_restarts_total") == restarts


def test_content_length_lies(site: Site) -> None:
    server, key = site.server, site.key
    submitted = server.metric(key, "nnglass_jobs_submitted_total")
    body = json.dumps({"version": WIRE_VERSION, "model": NAME, "nodes": []}).encode()
    json_type = {"Content_Type": "application/json"}
    # Shorter than the body: the server reads a truncated graph.
    status, answer = raw(server, http_request("POST", "/v1/jobs", key, body, Content_Length="5", **json_type))
    assert status == 400, answer
    for length in ("abc", "-1", "1e3", "0x10"):  # not a length at all
        status, answer = raw(server, http_request("POST", "/v1/jobs", key, body, Content_Length=length,
                                                  **json_type))
        assert status is not None and 400 <= status < 500, answer
    two = http_request("POST", "/v1/jobs", key, body, **json_type).replace(
        b"\r\n\r\n", f"\r\nContent-Length: {len(body) - 3}\r\n\r\n".encode(), 1)
    status, answer = raw(server, two)
    assert status is not None and 400 <= status < 500, answer
    # Longer than the body, then the client hangs up: no answer is owed, no job is made.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(http_request("POST", "/v1/jobs", key, body, Content_Length="100000", **json_type))
        time.sleep(0.3)
    assert server.metric(key, "nnglass_jobs_submitted_total") == submitted
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_multipart_without_graph(http: httpx.Client, valid: Valid) -> None:
    r = http.post("/v1/jobs", files={"tensors": ("t.safetensors", valid[1], "application/octet-stream")})
    assert "graph" in refused(r, 400, "MalformedError")["message"]
    r = http.post("/v1/jobs", files={"graf": ("g.json", json.dumps(valid[0]).encode(), "application/json")})
    refused(r, 400, "MalformedError")
    r = http.post("/v1/jobs", content=b"--nope\r\n\r\n", headers={"Content-Type": "multipart/form-data"})
    refused(r, 400)
    r = http.post("/v1/jobs", content=json.dumps(valid[0]).encode(), headers={"Content-Type": "text/plain"})
    refused(r, 400, "MalformedError")


# --- jobs that are not yours ------------------------------------------------------------


JOB_PATHS = [("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/events"), ("GET", "/v1/jobs/{}/result"),
             ("DELETE", "/v1/jobs/{}")]


def test_other_users_jobs(site: Site, http: httpx.Client, valid: Valid) -> None:
    r = post(http, valid[0], valid[1])
    assert r.status_code == 202
    job = r.json()["id"]
    assert wait_for(http, job)["status"] == "COMPLETED"
    bob = site.server.keys.create("bob")[1]
    with site.server.client(bob) as other:
        for method, path in JOB_PATHS:
            refused(other.request(method, path.format(job)), 404, "NotFoundError")
    # Still alice's, untouched: not cancelled, its result there.
    assert http.get(f"/v1/jobs/{job}").json()["status"] == "COMPLETED"
    assert decode_results(http.get(f"/v1/jobs/{job}/result").content)


@pytest.mark.parametrize("job", [secrets.token_urlsafe(24), "a" * 5000, "%00", "job%0Aid", "%E2%80%AE"],
                         ids=["random", "long", "nul", "newline", "unicode"])
def test_unknown_job_ids(http: httpx.Client, job: str) -> None:
    for method, path in JOB_PATHS:
        r = http.request(method, path.format(job))
        assert r.status_code == 404, (method, path, r.status_code, r.text)


TRAVERSALS = ["/v1/jobs/../../etc/passwd", "/v1/jobs/../../../../etc/passwd/result",
              "/v1/jobs/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/result",
              "/v1/jobs/%2e%2e/result", "/v1/jobs/../nnglass.db", "/v1/jobs/%2e%2e%2fnnglass.db/result",
              "/v1/jobs/..", "/v1/jobs/./result",
              "/v1/jobs/%2e%2e%2f..%2fhostile-outside0%2fsecret.txt/result",
              "/v1/jobs/%2e%2e%5c%2e%2e%5cetc%5cpasswd/events", "/v1/jobs/..;/..;/etc/passwd"]


def test_path_traversal(site: Site) -> None:
    for path in TRAVERSALS:
        for method in ("GET", "DELETE"):
            status, answer = raw(site.server, http_request(method, path, site.key))
            # 405: DELETE on a path that routes to `/result` or `/events`, which only GET
            assert status == 404 or (method, status) == ("DELETE", 405), (method, path, answer)
            assert SECRET.encode() not in answer and b"root:" not in answer
    assert site.sentinel.read_text() == SECRET


# --- keys ---------------------------------------------------------------------------------

ENDPOINTS = [("POST", "/v1/jobs"), *((m, p.format("no-such-job-0123456789")) for m, p in JOB_PATHS),
             ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("GET", "/v1/nothing-here")]


def test_keys_are_checked_first(site: Site, http: httpx.Client, valid: Valid) -> None:
    server = site.server
    job = post(http, valid[0], valid[1]).json()["id"]  # alice's, real
    _, revoked = server.keys.create("mallory")
    assert server.keys.revoke("mallory")
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer garbage"},
        {"Authorization": "Bearer nng_" + secrets.token_urlsafe(32)},
        {"Authorization": f"Bearer {revoked}"}, {"Authorization": f"Basic {site.key}"},
        {"Authorization": site.key}, {"Authorization": "Bearer nng_" + "a" * 10_000},
        {"X-Api-Key": site.key},
    ]
    for headers in bad_headers:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for method, path in [*ENDPOINTS, *((m, p.format(job)) for m, p in JOB_PATHS)]:
                refused(client.request(method, path), 401, "AuthError")
            assert client.get("/health").status_code == 200
    # The key comes before the size limit and before the body is read.
    status, answer = raw(server, http_request("POST", "/v1/jobs", None, b"{}", Content_Length=str(10**12)))
    assert status == 401, answer
    assert wait_for(http, job)["status"] == "COMPLETED"  # nobody cancelled it


def test_quota(site: Site, http: httpx.Client, lm: LanguageModel, valid: Valid) -> None:
    slow_json, slow_tensors = wire.encode(slow_graph(lm))
    busy = post(http, slow_json, slow_tensors).json()["id"]
    while http.get(f"/v1/jobs/{busy}").json()["status"] == "QUEUED":  # running: it counts no more
        time.sleep(0.02)
    accepted, answer = [], None
    for _ in range(12):
        r = post(http, valid[0], valid[1])
        if r.status_code != 202:
            answer = r
            break
        accepted.append(r.json()["id"])
    assert answer is not None, f"{len(accepted)} jobs queued, no 429"
    refused(answer, 429)
    assert len(accepted) == 8  # max_queued_per_key in the test config
    bob = site.server.keys.create("bob-quota")[1]
    with site.server.client(bob) as other:  # a quota is per key
        theirs = post(other, valid[0], valid[1])
        assert theirs.status_code == 202
        for job in accepted:
            http.delete(f"/v1/jobs/{job}")
        assert wait_for(other, theirs.json()["id"])["status"] == "COMPLETED"
    assert wait_for(http, busy)["status"] == "COMPLETED"


# --- and after all that -------------------------------------------------------------------


def test_still_serving_and_nothing_written_outside_home(site: Site, http: httpx.Client, lm: LanguageModel,
                                                        valid: Valid) -> None:
    assert httpx.get(f"{site.server.url}/health").json()["status"] == "ok"
    r = post(http, valid[0], valid[1])
    assert r.status_code == 202
    job = r.json()["id"]
    assert wait_for(http, job)["status"] == "COMPLETED"
    values = decode_results(http.get(f"/v1/jobs/{job}/result").content)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(re.search(r"^threads = (\d+)", site.server.config.read_text(), re.M)[1]))
    try:  # as many threads as the server's worker: bitwise the same numbers
        with lm.trace("hi"):
            ref = lm.model.layers[0].output.save()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(values[0], ref.value)
    assert not site.touched.exists() and site.sentinel.read_text() == SECRET
    assert list(site.cwd.iterdir()) == []
    assert listing(site.base, skip=site.server.home) == site.before


def test_quota_holds_under_concurrent_submissions(site: Site, http: httpx.Client, lm: LanguageModel,
                                                  valid: Valid) -> None:
    """Many submissions at once from one key: still at most `max_queued_per_key` wait. A
    busy worker keeps them waiting; should one start anyway before the last answer (a slow
    machine), it freed its place, and the bound counts it."""
    slow_json, slow_tensors = wire.encode(slow_graph(lm, k=16))  # busy through every submission
    busy = post(http, slow_json, slow_tensors).json()["id"]
    while http.get(f"/v1/jobs/{busy}").json()["status"] == "QUEUED":
        time.sleep(0.02)
    barrier = threading.Barrier(24)
    answers: list[httpx.Response] = []

    def submit() -> None:
        with site.server.client(site.key) as client:
            barrier.wait()
            answers.append(post(client, valid[0], valid[1]))

    threads = [threading.Thread(target=submit) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answered = time.time()
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    try:
        assert all(r.status_code in (202, 429) for r in answers)
        began = [http.get(f"/v1/jobs/{j}").json()["started_at"] for j in accepted]
        started = [t for t in began if t is not None and t < answered]
        assert len(accepted) <= 8 + len(started), \
            f"{len(accepted)} jobs accepted ({len(started)} started meanwhile) with max_queued_per_key = 8"
    finally:
        for job in (*accepted, busy):  # busy too: nothing of this test left running
            http.delete(f"/v1/jobs/{job}")
        wait_for(http, busy)
