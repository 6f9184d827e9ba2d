"""A rank group on the session's two-node Ray cluster (tests/ray_cluster.py): a model with
`shards = 2` and `shard_placement = "STRICT_SPREAD"` has one rank on each node, and its
remote results equal the unsharded model's (1e-5): one model spanning two machines."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import nnglass
from nnglass import _config
from service_fixtures import Engine


@pytest.fixture(scope="module")
def ray_engine(ray_cluster: Any) -> Engine:
    return Engine("ray", ray_cluster)


def test_two_ranks_one_per_node_serve_the_unsharded_results(start_server: Any, tiny_config: Any,
                                                            tiny_alone: Any, ray_engine: Any) -> None:
    group = 'shards = 2\nshard_placement = "STRICT_SPREAD"\nresources = {num_cpus = 1}\n'
    text = tiny_config().replace("threads =", group + "threads =", 1)
    server = start_server("sharded-ray", text, engine=ray_engine)
    try:
        _, key = server.keys.create("alice")
        lm = tiny_alone
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_config, "_overrides", {})
            nnglass.configure(host=server.url, api_key=key)
            with lm.trace("Hello world", remote=True):
                lm.model.layers[0].self_attn.q_proj.output[:, -1] = 0.5
                logits = lm.output.logits.save()
        with lm.trace("Hello world"):
            lm.model.layers[0].self_attn.q_proj.output[:, -1] = 0.5
            ref = lm.output.logits.save()
        torch.testing.assert_close(logits.value, ref.value, atol=1e-5, rtol=1e-5)
        nodes = re.findall(r"ranks of model 'tiny' on Ray nodes (.+)", server.log())
        assert nodes and sorted(nodes[-1].split()) == ["127.0.0.2", "127.0.0.3"], server.log()
    finally:
        server.stop()
