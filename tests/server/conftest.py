"""The service tests' fixtures: tests/service_fixtures.py (shared with tests/fuzz), and here
the backend combinations a module's tests run on (issue 10's matrix), and the OpenAI
endpoints' server (tests/server/provider_fixtures.py)."""

from __future__ import annotations

from typing import Any

import pytest
from provider_fixtures import chat_dir as chat_dir  # the OpenAI endpoints' server
from provider_fixtures import provider as provider

from service_fixtures import EMBEDDED, Backend, Engine
from service_fixtures import pg_clean as pg_clean
from service_fixtures import pg_database as pg_database
from service_fixtures import start_server as start_server  # the fixtures, by name
from service_fixtures import tiny_config as tiny_config
from service_fixtures import tiny_dir as tiny_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run this test (or module) once per backend combination named")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module fixture) that asks for `backend` runs once per combination its
    closest `pytest.mark.backends(...)` names ("embedded", "cluster"; default: embedded):
    a module marks itself (`pytestmark`) and a test may narrow or widen that."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = marker.args if marker is not None else ("embedded",)
        metafunc.parametrize("backend", names, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Embedded: subprocess workers, SQLite, a folder. Cluster: Ray actors on the session's
    two-node cluster, the session's PostgreSQL and moto S3 (one of each per session)."""
    if request.param == "embedded":
        return EMBEDDED
    return Backend("cluster", request.getfixturevalue("ray_engine"),
                   request.getfixturevalue("postgres"), request.getfixturevalue("s3"))


@pytest.fixture(scope="session")
def ray_engine(ray_cluster: Any) -> Engine:
    """Replicas on the session's two-node Ray cluster (tests/conftest.py, `ray_cluster`)."""
    return Engine("ray", ray_cluster)

