"""The fault suite's fixtures: the service fixtures (tests/service_fixtures.py), by name,
and the tiny model's client-side LanguageModel the tests record their graphs with."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnglass import LanguageModel
from service_fixtures import TINY
from service_fixtures import start_server as start_server  # the fixtures, by name
from service_fixtures import tiny_config as tiny_config
from service_fixtures import tiny_dir as tiny_dir


@pytest.fixture(scope="session")
def lm(tiny_dir: Path) -> LanguageModel:
    return LanguageModel(str(tiny_dir), name=TINY)
