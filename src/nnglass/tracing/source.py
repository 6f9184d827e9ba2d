"""`module.source`: the operations inside a module's forward, as sites (graph/source.py).

`lm.model.layers[0].self_attn.source.softmax_0.output` records a `get` of the site
`model.layers.0.self_attn.source.softmax_0` (kind `output`), the attention probabilities
under eager attention; `.input`, `.inputs` and assignment work as on a module, and
`.call(i)` picks the module's i-th call. A name the table does not have is an error at
the user's line; so is one the model's forward never makes, where the model can tell
(a LanguageModel runs its forward on the meta device once per module to list them:
`print(lm.model.layers[0].self_attn.source)`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import TraceError
from ..graph.source import SOURCE_OPS, known_ops, parse_name, source_path
from .envoy import CallSites
from .tracer import _CURRENT, user_where

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .envoy import Envoy


class Source:
    """The addressable operations of one module's forward (`module.source`)."""

    __slots__ = ("_envoy",)

    def __init__(self, envoy: Envoy) -> None:
        object.__setattr__(self, "_envoy", envoy)

    def _names(self) -> list[str] | None:
        """The operations one call of the module makes, in order (None: the model cannot
        tell). Inside a trace: from the fake forward on its inputs (record-time metadata,
        cached per input signature); outside: what the model's lister says."""
        path = self._envoy._path
        tracer = _CURRENT.get()
        try:
            if tracer is not None and tracer.graph.invokes and hasattr(tracer.model, "_fake_world"):
                meta = tracer.metadata()
                with meta._quiet():
                    return meta.world().operations(path)
            lister = self._envoy._lister
            return None if lister is None else lister(path)
        except Exception as e:  # a forward the fake run cannot do: the real run will tell
            log.debug("no listing of %s.source: %s", path or "<root>", e)
            return None

    def __getattr__(self, name: str) -> Operation:
        if name.startswith("__"):
            raise AttributeError(name)
        path = self._envoy._path or "<root>"
        if parse_name(name) is None:
            raise TraceError(f"`{path}.source` has no operation {name!r}: operations are named "
                             f"<op>_<n> (the n-th call, from 0), with <op> one of "
                             f"{', '.join(SOURCE_OPS)}; {self._listing_hint()}", user_where())
        names = self._names()
        if names is not None and name not in names:
            raise TraceError(f"`{path}`'s forward makes no call {name!r}; it makes: "
                             f"{', '.join(names) or 'none of ' + ', '.join(SOURCE_OPS)}", user_where())
        return Operation(self._envoy, name, 0)

    def _listing_hint(self) -> str:
        names = self._names()
        return f"this forward makes: {', '.join(names) or 'none'}" if names is not None else \
            "print(module.source) lists them"

    def __dir__(self) -> list[str]:
        return self._names() or []

    def __repr__(self) -> str:
        path = self._envoy._path or "<root>"
        names = self._names()
        lines = [f"{path}.source: the operations one call of {type(self._envoy._module).__name__}.forward "
                 "makes (its own calls, the functions it calls, its submodules'), in order:"]
        if names is None:
            lines.append("  (this model cannot run its forward to list them; names are <op>_<n>)")
        else:
            lines += [f"  {n}" for n in names] or ["  (none)"]
        lines.append("addressable operations:")
        lines.append(known_ops())
        return "\n".join(lines)


class Operation(CallSites):
    """One operation of a module's forward: `.output`, `.input`, `.inputs`, as on a module."""

    __slots__ = ("_call", "_envoy", "_name")

    def __init__(self, envoy: Envoy, name: str, call: int) -> None:
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_call", call)

    @property
    def _path(self) -> str:
        return source_path(self._envoy._path, self._name)

    def _site(self) -> tuple[str, int]:
        return self._path, self._call

    def _label(self) -> str:
        return f".source.{self._name}"

    def call(self, i: int) -> Operation:
        """This operation in the module's i-th call (0-based) of the current step."""
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TraceError(f"call index must be an int >= 0, got {i!r}", user_where())
        return Operation(self._envoy, self._name, i)

    def __repr__(self) -> str:
        return f"<operation {self._path}>"
