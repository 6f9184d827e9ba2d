"""Fixtures for the tensor-parallel tests: each model's rank group is started once per
test session (starting one costs seconds: N processes load transformers), beside the same
model unsharded, which every test compares against.

- `tiny_pair`: the tiny random Llama (tests/service_fixtures.py) on 2 ranks, and alone
  (`tiny_alone`, for the tests whose sharded model is a server's).
- `smol_pair`: SmolLM2-135M (9 heads, 3 KV heads) on 3 ranks, and alone.
- `fail_file`: a path that, while it exists, makes rank 1 of the tiny group refuse every
  run before it starts (follower.py's test hook): a failure on one rank only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnglass import LanguageModel
from service_fixtures import start_server as start_server  # the fixtures, by name
from service_fixtures import tiny_config as tiny_config
from service_fixtures import tiny_dir as tiny_dir

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Pair:
    sharded: LanguageModel
    alone: LanguageModel


@pytest.fixture(scope="session")
def fail_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shard-fail") / "fail"


@pytest.fixture(scope="session")
def tiny_alone(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name="tiny")


@pytest.fixture(scope="session")
def tiny_pair(tiny_dir: Path, tiny_alone: LanguageModel, fail_file: Path) -> Iterator[Pair]:
    mp = pytest.MonkeyPatch()
    mp.setenv("NNGLASS_SHARD_TEST_FAIL", f"1:{fail_file}")  # read by the ranks it starts
    sharded = LanguageModel(str(tiny_dir), name="tiny", shards=2)
    sharded._rank_group().handle.start(timeout=180)
    mp.undo()
    yield Pair(sharded, tiny_alone)
    sharded._rank_group().close()


@pytest.fixture(scope="session")
def smol_pair() -> Iterator[Pair]:
    mp = pytest.MonkeyPatch()
    mp.setenv("NNGLASS_CACHE", os.environ.get("NNGLASS_CACHE", str(REPO / ".nnglass-cache")))
    sharded = LanguageModel("smollm2-135m", shards=3)
    sharded._rank_group().handle.start(timeout=300)
    alone = LanguageModel("smollm2-135m")
    yield Pair(sharded, alone)
    mp.undo()
    sharded._rank_group().close()
