"""One rank of a tensor-parallel group: join the group, load the model sharded by
transformers' own plan (`DistributedConfig(tp_size=N)`: the architecture's
`base_model_tp_plan`, no model code of ours), and measure its sites.

Invariants:
- Every rank runs `load_rank` with the same config, in the same order of collectives:
  the group's join, transformers' sharded load, the shard-layout probe, the lookup probe.
- A model that cannot be sharded (no plan, heads that do not divide by N) is refused by
  `check_shardable` before any rank starts, with what to change.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch

from ..errors import NNglassError

logger = logging.getLogger(__name__)

COLLECTIVE_SECONDS = 300.0  # a collective waiting longer than this fails (a rank is gone)
_PROBE = [[1, 2, 3]]  # the prompt the shard layouts are measured on


def check_shardable(hf_config: Any, world: int) -> None:
    """Refuse a model transformers cannot split over `world` ranks, naming why."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not getattr(text, "base_model_tp_plan", None):
        raise NNglassError(f"{type(text).__name__} has no tensor-parallel plan in transformers "
                           "(base_model_tp_plan): this architecture cannot run with shards > 1")
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(text, attr, None)
        if isinstance(n, int) and n % world:
            raise NNglassError(f"the model has {attr} = {n}, which does not divide by shards = {world}: "
                               f"use a number of shards that divides it")


def backend_for(device: str) -> str:
    """gloo on CPU; nccl on CUDA (written for GPUs, untested here: this machine has none)."""
    return "nccl" if device == "cuda" else "gloo"


def open_store(host: str, port: int, rank: int, world: int) -> Any:
    """The group's rendezvous: rank 0 serves it (port 0: any free one, `store.port`)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, world, is_master=rank == 0, wait_for_workers=False,
                         timeout=timedelta(seconds=COLLECTIVE_SECONDS))


def load_rank(config: dict[str, Any], rank: int, world: int, store: Any) -> Any:
    """This rank's `ShardedLanguageModel` (without peers: rank 0 attaches them)."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    from ..graph.check import DTYPES
    from ..models import loading
    from ..models.metaforward import MetaCopy
    from ..runtime.shards import SiteLayouts
    from ..server.exposure import lookup_sites
    from .lockstep import ShardedLanguageModel

    began = time.perf_counter()
    device = str(config.get("device") or "cpu")
    local_rank = int(config.get("local_rank", rank))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if str(config.get("host", "127.0.0.1")).startswith("127.") and backend_for(device) == "gloo":
        # A group that meets on loopback talks on loopback (gloo would bind the address the
        # host name resolves to); across machines the operator names the interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(int(config.get("threads") or 1))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_SECONDS))
    dtype = DTYPES[config.get("dtype", "float32")]
    source = loading.resolve_model_source(config["source"])
    hf_config, tokenizer = loading.load_config_and_tokenizer(source)
    check_shardable(hf_config, world)
    joined = time.perf_counter()
    model = loading.load_model(source, dtype=dtype, distributed_config=DistributedConfig(tp_size=world))
    loaded = time.perf_counter()
    ids = torch.tensor(_PROBE)
    mask = torch.ones_like(ids)
    meta = MetaCopy(loading.meta_model(hf_config, dtype))
    full = {(p, k): v for (p, k, n), v in meta.capture(
        lambda m, x: m(input_ids=x(ids), attention_mask=x(mask), use_cache=False)).items() if n == 0}
    here = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    sites = SiteLayouts.measure(
        model, full, lambda m: m(input_ids=ids.to(here), attention_mask=mask.to(here), use_cache=False),
        rank, world)
    measured = time.perf_counter()
    lookups = lookup_sites(model)
    logger.info("rank %d/%d: %s loaded, %d sharded sites (join %.1f s, load %.1f s, layouts %.1f s, "
                "lookups %.1f s)", rank, world, config.get("name"), len(sites.cuts), joined - began,
                loaded - joined, measured - loaded, time.perf_counter() - measured)
    return ShardedLanguageModel(model, tokenizer=tokenizer, name=config.get("name"), sites=sites,
                                lookups=lookups, rank=rank)
