"""Rank 0 of an embedded group: the model's worker process starts ranks 1..N-1 as its
own subprocesses (`follower.py`), serves the group's rendezvous on loopback, and loads
its own shard with them. `PipePeers` is rank 0's side of those subprocesses.

Invariants:
- The model is checked (`check_shardable`) before any rank starts: a refused model
  costs no subprocess.
- The followers die with rank 0: they watch it, and its pipes close when it exits.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from typing import Any

from ..errors import NNglassError
from .frames import read_frame, write_frame
from .lockstep import GroupBroken, ShardedLanguageModel

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class PipePeers:
    """The followers of rank 0, one subprocess each, spoken to in frames."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.procs = procs

    def _send(self, header: dict[str, Any], *blobs: bytes) -> None:
        for p in self.procs:
            try:
                write_frame(p.stdin, header, *blobs)  # type: ignore[arg-type]
            except OSError as e:
                raise GroupBroken(f"rank {self.procs.index(p) + 1} is gone ({e})") from None

    def _answers(self) -> list[dict | None]:
        answers: list[dict | None] = []
        for k, p in enumerate(self.procs):
            try:
                header, _ = read_frame(p.stdout)  # type: ignore[arg-type]
            except (EOFError, OSError):
                raise GroupBroken(f"rank {k + 1} is gone (exit code {p.poll()})") from None
            answers.append(header.get("error"))
        return answers

    def prepare(self, run: dict[str, Any], blobs: list[bytes]) -> list[dict | None]:
        self._send({"run": run}, *blobs)
        return self._answers()

    def start(self, go: bool) -> None:
        self._send({"go": go})

    def outcomes(self) -> list[dict | None]:
        return self._answers()

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            if p.poll() is None:
                p.kill()
            p.wait()


def start_group(config: dict[str, Any]) -> ShardedLanguageModel:
    """Load `config`'s model over `config["shards"]` ranks; this process is rank 0. With a
    `placement_group` (a Ray actor's config: server/ray_worker.py) the other ranks are Ray
    actors in its bundles (ray_group.py); else subprocesses of this one."""
    from ..models import loading
    from .rank import check_shardable, load_rank, open_store

    world = int(config["shards"])
    hf_config, _ = loading.load_config_and_tokenizer(loading.resolve_model_source(config["source"]))
    check_shardable(hf_config, world)
    if config.get("placement_group") is not None:
        from .ray_group import start_ray_group

        rest = {k: v for k, v in config.items() if k != "placement_group"}
        return start_ray_group(rest, config["placement_group"])
    store = open_store(HOST, 0, 0, world)
    procs = []
    try:
        for rank in range(1, world):
            proc = subprocess.Popen([sys.executable, "-P", "-m", "nnglass.shards.follower"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(proc)
            write_frame(proc.stdin, {"config": {**config, "rank": rank, "world": world, "host": HOST,  # type: ignore[arg-type]
                                                "port": store.port}})
        lm = load_rank({**config, "host": HOST}, 0, world, store)
        for rank, proc in enumerate(procs, 1):
            header, _ = read_frame(proc.stdout)  # type: ignore[arg-type]
            if not header.get("ready"):
                why = header.get("error") or {}
                raise NNglassError(f"rank {rank} failed to load: {why.get('type')}: {why.get('message')}")
    except BaseException:
        PipePeers(procs).close()
        raise
    lm.attach(PipePeers(procs))
    object.__setattr__(lm, "_store", store)  # the rendezvous lives as long as the group
    object.__setattr__(lm, "nodes", (HOST,) * world)
    return lm
