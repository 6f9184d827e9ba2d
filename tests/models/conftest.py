"""Fixtures for the LanguageModel tests.

- `nnglass_cache`: NNGLASS_CACHE=<repo>/.nnglass-cache for the whole session, so the real
  SmolLM2 is converted once per machine (a git-ignored folder that outlives test runs).
- `tiny`: a tiny random GPT-2 or Llama (parametrized), checked after each test to hold no
  hooks, no `.grad` and unchanged weights.
- `pair`: two LanguageModels on the same weights, one running graphs as they are, one
  after a JSON round trip (NNGLASS_ROUNDTRIP=1 is read when a model is constructed).
- `both(pair, experiment)`: run `experiment(lm)` (which traces and returns its saved
  values) on each, check the codec really ran and the saved values are bitwise equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_fixtures as lmf
import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[2]

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="session")
def nnglass_cache() -> Iterator[Path]:
    cache = REPO / ".nnglass-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("NNGLASS_CACHE", str(cache))
    try:
        yield cache
    finally:
        mp.undo()


@dataclass
class Tiny:
    """A tiny HF causal LM, its architecture name and where its first decoder layer is
    (`layer0(x)` works on the HF module and on the LanguageModel alike)."""

    arch: str
    hf: nn.Module
    layer0: Callable[[Any], Any]
    tokenizer: Any


_LAYER0: dict[str, Callable[[Any], Any]] = {
    "gpt2": lambda m: m.transformer.h[0],
    "llama": lambda m: m.model.layers[0],
}
_BUILD = {"gpt2": lmf.tiny_gpt2, "llama": lmf.tiny_llama}


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest) -> Iterator[Tiny]:
    hf = _BUILD[request.param]()
    before = lmf.fingerprint(hf)
    yield Tiny(request.param, hf, _LAYER0[request.param], lmf.char_tokenizer())
    assert lmf.fingerprint(hf) == before, "the model was not left as it was"


@pytest.fixture
def pair(tiny: Tiny) -> lmf.Pair:
    from nnglass import LanguageModel

    def build() -> Any:
        return LanguageModel(tiny.hf, tokenizer=lmf.char_tokenizer(), name=f"tiny-{tiny.arch}")

    return lmf.Pair(lmf.make_lm(build, roundtrip=False), lmf.make_lm(build, roundtrip=True))


@pytest.fixture
def both(monkeypatch: pytest.MonkeyPatch) -> Callable[[lmf.Pair, Callable[[Any], Any]], Any]:
    """`both(pair, experiment)` → the local run's saved values (plain values: Saved
    proxies unwrapped), after checking the round-trip run gave bitwise the same."""

    def run(pair: lmf.Pair, experiment: Callable[[Any], Any]) -> Any:
        local = lmf.unwrap(experiment(pair.local))
        from nnglass.graph import wire

        sent: list[Any] = []
        real = wire.roundtrip

        def spy(graph: Any) -> Any:
            sent.append(graph)
            return real(graph)

        with monkeypatch.context() as m:
            m.setattr(wire, "roundtrip", spy)
            remote = lmf.unwrap(experiment(pair.roundtrip))
        assert sent, "NNGLASS_ROUNDTRIP=1 did not send the graph through the JSON codec"
        lmf.assert_bitwise_equal(local, remote, "local vs JSON round trip")
        return local

    return run
