"""The service tests' fixtures: tests/service_fixtures.py (shared with tests/fuzz), and here
the engines a module's tests run on."""

from __future__ import annotations

from typing import Any

import pytest

from service_fixtures import SUBPROCESS, Engine
from service_fixtures import pg_clean as pg_clean
from service_fixtures import pg_database as pg_database
from service_fixtures import start_server as start_server  # the fixtures, by name
from service_fixtures import stores as stores
from service_fixtures import tiny_config as tiny_config
from service_fixtures import tiny_dir as tiny_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(*names): run this module's `engine` tests on each engine")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module fixture) that asks for `engine` runs once per engine its module's
    `pytestmark = pytest.mark.engines("subprocess", "ray")` names (default: subprocess)."""
    if "engine" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("engines")
        names = marker.args if marker is not None else ("subprocess",)
        metafunc.parametrize("engine", names, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue("ray_engine") if request.param == "ray" else SUBPROCESS


@pytest.fixture(scope="session")
def ray_engine(ray_cluster: Any) -> Engine:
    """Replicas on the session's two-node Ray cluster (tests/conftest.py, `ray_cluster`)."""
    return Engine("ray", ray_cluster)
