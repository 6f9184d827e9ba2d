"""Where `LanguageModel(name, remote=True)` finds a model's config and tokenizer.

Invariant: in this order, and nothing else: a local folder of that name; the server's
`GET /v1/models/{name}/meta` (cached, remote/meta.py); a built-in name (converted locally
as always). Never the hub. A name found in none of them is one error naming each place
tried and what each said.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import NNglassError, RemoteError


def remote_source(name: str, backend: Any) -> tuple[Path, bool, Any]:
    """(folder, whether it came from the server, the backend traces run on)."""
    from . import loading

    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder, False, backend
    if backend is None:
        from ..remote.client import shared_backend

        backend = shared_backend()
    try:
        from ..remote.meta import remote_model_folder

        return remote_model_folder(name, backend), True, backend
    except RemoteError as e:
        said = e.message
    builtin = name.lower() in loading._BUILTINS
    if builtin:
        return Path(loading.resolve_model_source(name)), False, backend
    raise NNglassError(f"model {name!r} was found neither locally nor on the server: no local folder "
                       f"{str(folder)!r} and no built-in model of that name "
                       f"({', '.join(sorted(loading._BUILTINS))}); the server said: {said}")
