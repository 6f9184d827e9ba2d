"""Replicas as Ray actors on the session's real two-node cluster (tests/ray_cluster.py;
head 127.0.0.2 with resource `node_a`, worker 127.0.0.3 with `node_b`, token auth on).

- The cluster turns away a driver without its token.
- `replicas = 2` with `num_cpus = 3` on nodes of 4 CPUs puts one replica on each node;
  a second model asks for `node_a` and shares that node. Results are bitwise the local
  run's, whichever replica ran them.
- `ray.kill` of a replica mid-job: that job ends ERROR saying the worker crashed, the
  replica comes back (the service restarts it), the next job completes; the other model
  never notices.
- A worker node that leaves (its raylet and everything on it stopped) takes its replica
  with it; the replica on the other node keeps serving; when the node rejoins, the
  replica is back on it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from nnglass import LanguageModel
from nnglass.graph.ir import Graph
from nnglass.graph.results import decode_results
from service_fixtures import recording, submit, wait_for

TINY, SIDE = "tiny", "side"


def two_nodes_toml(tiny_dir: Path) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = PORT
home = "HOME"
max_queued_per_key = 16

[[models]]
name = "{TINY}"
source = "{tiny_dir}"
threads = {torch.get_num_threads()}
replicas = 2
resources = {{num_cpus = 3}}  # nodes have 4 CPUs each: one replica a node

[[models]]
name = "{SIDE}"
source = "{tiny_dir}"
threads = {torch.get_num_threads()}
resources = {{num_cpus = 1, node_a = 1}}  # the head node, beside a replica of {TINY}
"""


@pytest.fixture(scope="module")
def site(start_server: Callable[..., Any], tiny_dir: Path, ray_engine: Any) -> Iterator[Any]:
    server = start_server("ray-two-nodes", two_nodes_toml(tiny_dir), engine=ray_engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lms(tiny_dir: Path) -> dict[str, LanguageModel]:
    return {name: LanguageModel(str(tiny_dir), name=name) for name in (TINY, SIDE)}


def record(lm: LanguageModel, prompt: str, size: int = 0) -> Graph:
    """The graph of a trace (not run here): a block's output and the last logits; `size`
    adds a chain of matrix products that keeps a worker busy for a few seconds."""
    with recording(lm.trace(prompt)) as tracer:
        lm.model.layers[0].output.save()
        if size:
            m = lm.model.layers[0].output.sum().expand(size, size).contiguous()
            for _ in range(8):
                m = m @ m
            m.sum().save()
        lm.output.logits[:, -1].save()
    return tracer.graph


def assert_as_local(http: httpx.Client, job: str, lm: LanguageModel, graph: Graph) -> None:
    info = wait_for(http, job)
    assert info["status"] == "COMPLETED", info
    remote, local = decode_results(http.get(f"/v1/jobs/{job}/result").content), lm.run_graph(graph)
    assert remote.keys() == local.keys()
    for node_id, value in local.items():  # jobs sent together may share a pass: batch tolerance
        torch.testing.assert_close(remote[node_id], value, atol=1e-4, rtol=1e-4)


def log(server: Any) -> str:
    return (server.home / "server.log").read_text(errors="replace")


def replica_nodes(server: Any, model: str) -> list[str]:
    """The node address of each start of `model`'s replicas, in order (the server logs it)."""
    return re.findall(rf"worker for model '{model}' ready \(pid \d+\) on Ray node (\S+)", log(server))


def replicas_alive(server: Any, key: str, model: str) -> int:
    auth = {"Authorization": f"Bearer {key}"}
    models = httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).json()
    return next(int(m["replicas_alive"]) for m in models if m["name"] == model)


def wait_alive(server: Any, key: str, model: str, count: int, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while replicas_alive(server, key, model) != count:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)


def test_a_driver_without_the_token_is_turned_away(ray_cluster: Any) -> None:
    """(With the token, a driver joins: the server, and the killer below.)"""
    refused = ray_cluster.driver("print('joined')", token=False, timeout=60)
    assert refused.returncode != 0 and "joined" not in refused.stdout
    assert "token" in (refused.stderr + refused.stdout).lower(), refused.stderr[-2000:]


def test_replicas_on_both_nodes_give_the_local_results(site: Any, lms: dict[str, LanguageModel]) -> None:
    key = site.keys.create("alice")[1]
    wait_alive(site, key, TINY, 2)  # the server is up once one replica of each model is
    assert sorted(replica_nodes(site, TINY)) == ["127.0.0.2", "127.0.0.3"]  # one a node
    assert replica_nodes(site, SIDE) == ["127.0.0.2"]
    with site.client(key) as http:
        jobs = [(lm, graph, submit(http, graph)) for lm in lms.values()
                for graph in (record(lm, p) for p in ("hello there", "a", "what now?", "xyz"))]
        for lm, graph, job in jobs:
            assert_as_local(http, job, lm, graph)
    assert not list((site.home / "jobs").glob("*/result.safetensors.tmp*"))


def test_ray_kill_mid_job_fails_that_job_and_the_replica_comes_back(
    site: Any, ray_cluster: Any, lms: dict[str, LanguageModel]
) -> None:
    key = site.keys.create("bob")[1]
    name = re.findall(rf"worker for model '{SIDE}' ready .* as (\S+)", log(site))[-1]
    go = ray_cluster.root / "kill-now"
    killer = ray_cluster.start_driver(  # joined before the job starts: it kills at once on `go`
        f"import os, time\nactor = ray.get_actor({name!r})\n"
        "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']), flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\nray.kill(actor)\n")
    assert killer.stdout is not None  # joined, and sees the two loopback nodes
    assert killer.stdout.readline() == "['127.0.0.2', '127.0.0.3']\n", killer.communicate()
    with site.client(key) as http:
        victim = submit(http, record(lms[SIDE], "hi", size=2500))
        wait_for(http, victim, ("RUNNING",))
        go.touch()
        assert killer.wait(timeout=60) == 0, killer.communicate()
        bystander = record(lms[TINY], "still here")
        other = submit(http, bystander)
        info = wait_for(http, victim)
        assert info["status"] == "ERROR" and "the worker crashed" in info["error"]["message"], info
        assert_as_local(http, other, lms[TINY], bystander)  # the other model never noticed
        wait_alive(site, key, SIDE, 1)
        again = record(lms[SIDE], "hi again")
        assert_as_local(http, submit(http, again), lms[SIDE], again)  # on the restarted replica
    assert len(replica_nodes(site, SIDE)) == 2


def test_a_node_that_leaves_and_rejoins_gets_its_replica_back(
    site: Any, ray_cluster: Any, lms: dict[str, LanguageModel]
) -> None:
    key = site.keys.create("carol")[1]
    starts = len(replica_nodes(site, TINY))
    ray_cluster.stop_node("node_b")
    try:
        wait_alive(site, key, TINY, 1, timeout=60)
        with site.client(key) as http:  # the replica on the head node serves meanwhile
            graphs = [record(lms[TINY], p) for p in ("one", "two", "three")]
            for graph, job in [(g, submit(http, g)) for g in graphs]:
                assert_as_local(http, job, lms[TINY], graph)
    finally:
        ray_cluster.start_node("node_b")
    wait_alive(site, key, TINY, 2)
    assert replica_nodes(site, TINY)[starts:] == ["127.0.0.3"]  # back on the node that rejoined
    with site.client(key) as http:
        graphs = [record(lms[TINY], p) for p in ("four", "five", "six", "seven")]
        for graph, job in [(g, submit(http, g)) for g in graphs]:
            assert_as_local(http, job, lms[TINY], graph)
