"""`GET /v1/models/{name}/meta`: what a client needs to trace a served model it does not
have, and nothing more (docs/providers.md).

Invariant: the answer holds the model's config, its tokenizer's files and its module tree
(paths and class names), never a weight: the files are the tokenizer as saved by
`save_pretrained` into an empty folder, plus the config and generation config as JSON,
so nothing else in the model's folder can leak through this route. The key check is the
Guard's, as for every route of the API.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .openai_graph import Frontend, Frontends

MAX_FILE_BYTES = 64 * 2**20  # a tokenizer file larger than this is not a tokenizer


def add_meta(app: FastAPI, frontends: Frontends) -> None:
    cache: dict[str, dict[str, Any]] = {}

    @app.get("/v1/models/{name}/meta")
    async def meta(name: str) -> dict[str, Any]:
        if name not in cache:  # NotFoundError (404) for a model not served
            cache[name] = await asyncio.to_thread(lambda: model_meta(frontends.get(name)))
        return cache[name]


def model_meta(frontend: Frontend) -> dict[str, Any]:
    config = frontend.lm.config.to_dict()
    if frontend.attention:  # as the workers load it, so a client lists the same `.source` operations
        config["attn_implementation"] = frontend.attention
    files: dict[str, bytes] = {"config.json": json.dumps(config, indent=2).encode()}
    with tempfile.TemporaryDirectory() as folder:
        frontend.tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES and path.name != "config.json":
                files[path.name] = path.read_bytes()
    generation = _generation_config(frontend)
    if generation is not None:
        files["generation_config.json"] = generation
    digest = hashlib.sha256(
        b"".join(hashlib.sha256(k.encode() + v).digest() for k, v in sorted(files.items()))
    )
    modules = [[path, type(m).__name__] for path, m in frontend.lm._module.named_modules()]
    return {"name": frontend.name, "digest": digest.hexdigest(), "modules": modules,
            "files": {k: base64.b64encode(v).decode("ascii") for k, v in files.items()}}


def _generation_config(frontend: Frontend) -> bytes | None:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(frontend.source).to_json_string().encode()
    except (OSError, ValueError):
        return None
