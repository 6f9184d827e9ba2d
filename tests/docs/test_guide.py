"""docs/guide.md runs as written: its ```python blocks, in order, in one namespace (like a
notebook). A block after `<!-- needs: server -->` runs with NNGLASS_HOST and
NNGLASS_API_KEY pointing at an embedded SmolLM2 server, started once, only if the page
has such blocks. Any block that raises fails the test, naming the block and its line."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import pytest

from nnglass import _config

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NEEDS = re.compile(r"^<!--\s*needs:\s*([\w, ]+?)\s*-->\s*$")


def blocks(text: str) -> list[tuple[int, set[str], str]]:
    """(first line number, needs, code) of every ```python block."""
    out, lines, i, needs = [], text.splitlines(), 0, set()
    while i < len(lines):
        m = _NEEDS.match(lines[i])
        if m:
            needs = {n.strip() for n in m.group(1).split(",")}
        fence = _FENCE.match(lines[i])
        if fence:
            start, i = i + 1, i + 1
            while not lines[i].startswith("```"):
                i += 1
            if fence.group(1) == "python":
                out.append((start + 1, needs, "\n".join(lines[start:i])))
            needs = set()
        i += 1
    return out


def test_blocks_are_found() -> None:
    found = blocks(GUIDE.read_text())
    assert len(found) >= 20
    assert any("server" in needs for _, needs, _ in found)


def test_guide_runs(smol: ModuleType, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "_overrides", {})  # no other test's configure() points it elsewhere
    monkeypatch.setenv("NNGLASS_CACHE", str(smol.CACHE))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "guide"}
    with ExitStack() as stack:
        server = None
        for line, needs, code in blocks(GUIDE.read_text()):
            if "server" in needs and server is None:
                server = stack.enter_context(smol.smol_server(tmp_path_factory.mktemp("guide-server")))
                monkeypatch.setenv("NNGLASS_HOST", server.url)
                monkeypatch.setenv("NNGLASS_API_KEY", server.key)
            try:
                padded = "\n" * (line - 1) + code  # errors name the guide's own line numbers
                exec(compile(padded, str(GUIDE), "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"the guide's block at docs/guide.md:{line} failed: "
                                     f"{type(e).__name__}: {e}") from e
