"""Where the user is: the file:line that recorded a node.

The user's line is the innermost frame that is not nnglass, torch, an installed library
or the standard library (numpy calling a proxy's method, contextlib running an invoke).
"""

from __future__ import annotations

import os
import sys
import sysconfig

import torch

_OURS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.dirname(os.path.abspath(torch.__file__)),
)
_LIBRARIES = tuple(
    {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
)
_SKIP_DIRS = _OURS + _LIBRARIES


def third_party_caller(depth: int = 2) -> str | None:
    """The file of the calling frame if it is a library other than nnglass and torch."""
    name = sys._getframe(depth).f_code.co_filename
    if name.startswith(_LIBRARIES) and not name.startswith(_OURS):
        return name
    return None


def user_where() -> str:
    """file:line of the innermost frame that is not nnglass, torch or library code."""
    f = sys._getframe(1)
    while f.f_back is not None and f.f_code.co_filename.startswith(_SKIP_DIRS):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}"


