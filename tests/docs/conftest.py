"""The embedded SmolLM2 server for the guide's blocks marked `<!-- needs: server -->`
(the same helper as tests/examples uses, loaded by path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _helper() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "smol_server.py"
    spec = importlib.util.spec_from_file_location("_nnglass_smol_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smol() -> ModuleType:
    """tests/examples/smol_server.py: `smol_server(home)`, `CACHE`, `REPO`."""
    return _helper()
