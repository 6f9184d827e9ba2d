"""A served model's config and tokenizer, fetched from the server and cached: what
`LanguageModel(name, remote=True)` builds on when nothing local has that name.

Invariants:
- Only the files `GET /v1/models/{name}/meta` names are written, each a plain file name
  (letters, digits, `.`, `_`, `-`; no folder, nothing hidden), into a cache folder per
  server and model (`NNGLASS_CACHE/remote/<host>/<name>`), complete or absent
  (`loading.build_once`). Weights never come: the server never sends them.
- The module tree built from the config is checked against the server's: a model whose
  code is not what transformers builds from its config is refused, not traced wrongly.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

from .. import _config
from ..errors import NNglassError, RemoteError

_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
META = "nnglass-meta.json"  # the module tree the server sent, kept beside the files


def remote_model_folder(name: str, backend: Any) -> Path:
    """The cached folder of `name` as served by `backend` (a RemoteBackend); fetched once."""
    from ..models.loading import build_once

    host = re.sub(r"[^A-Za-z0-9.-]+", "_", backend.host.split("://", 1)[-1])
    target = _config.cache_dir() / "remote" / host / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if target.is_dir():
        return target
    path = f"/v1/models/{urllib.parse.quote(name, safe='')}/meta"
    info = backend.request("GET", path, f"model {name!r}").json()

    def write(out: Path) -> None:
        files = info.get("files") if isinstance(info, dict) else None
        if not isinstance(files, dict) or "config.json" not in files:
            raise RemoteError(f"{backend.host} sent no config for model {name!r}")
        for file, data in files.items():
            if not isinstance(file, str) or not _FILE.fullmatch(file) or file == META:
                raise RemoteError(
                    f"{backend.host} sent a file named {file!r:.60} for model {name!r}; refused"
                )
            (out / file).write_bytes(base64.b64decode(data, validate=True))
        (out / META).write_text(
            json.dumps({"modules": info.get("modules", []), "digest": info.get("digest")})
        )

    return build_once(target, write)


def check_tree(folder: Path, module: Any, name: str) -> None:
    """The tree built here from the config must be the server's (paths and classes)."""
    sent = json.loads((folder / META).read_text()).get("modules", [])
    here = [[p, type(m).__name__] for p, m in module.named_modules()]
    if sent and sent != here:
        differ = next((a, b) for a, b in zip([*sent, None], [*here, None]) if a != b)
        raise NNglassError(f"model {name!r}: the module tree built from the server's config differs from the "
                           f"server's (server {differ[0]}, here {differ[1]}); this model needs code "
                           "transformers "
                           "does not have, so it cannot be traced from its config alone")
