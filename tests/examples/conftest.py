"""The embedded SmolLM2 server the example scripts are sent to (see smol_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from smol_server import Running, smol_server

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with smol_server(tmp_path_factory.mktemp("examples-server")) as running:
        yield running
