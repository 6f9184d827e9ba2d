"""Fixtures for the viz tests: tiny random Llama and GPT-2 LanguageModels on the
char-level tokenizer of `tests/models/lm_fixtures.py` (one token per character, so the
expected tick labels are the prompt's characters), each checked afterwards to be left as
it was (no hooks, no `.grad`, same weights).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# Reuse the language-model suite's tiny models and tokenizer rather than copy them
# (appended, so a collected tests/models keeps its own entry first; same file either way).
sys.path.append(str(Path(__file__).resolve().parents[1] / "models"))
import lm_fixtures as lmf


def _watched(hf: Any, name: str) -> Iterator[Any]:
    from nnglass import LanguageModel

    before = lmf.fingerprint(hf)
    yield LanguageModel(hf, tokenizer=lmf.char_tokenizer(), name=name)
    assert lmf.fingerprint(hf) == before, "the model was not left as it was"


@pytest.fixture
def llama() -> Iterator[Any]:
    yield from _watched(lmf.tiny_llama(), "tiny-llama")


@pytest.fixture
def gpt2() -> Iterator[Any]:
    """GPT-2 with eager attention, so an attention module returns its weights."""
    hf = lmf.tiny_gpt2()
    hf.set_attn_implementation("eager")
    yield from _watched(hf, "tiny-gpt2")
