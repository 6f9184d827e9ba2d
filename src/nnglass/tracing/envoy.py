"""Envoys: a mirror of the module tree that turns site accesses into graph nodes.

`net.layers[3].mlp.output` walks Envoys (validated against the real module tree, so
a bad path fails at the user's line) and records a `get` of site ("layers.3.mlp",
"output"). Envoys hold no per-trace state: the active tracer comes from a context
variable, so two threads can trace the same model at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..errors import TraceError
from ..graph.ir import GET, MODULE, PARAM, SET, Invoke
from .proxy import Proxy
from .tracer import Tracer, current_tracer, user_where

Lister = Callable[[str], "list[str] | None"]


class TracedModel(Protocol):
    """What a Tracer needs from the model it records against (NNModel, LanguageModel)."""

    name: str

    def _prepare_invoke(self, tracer: Tracer, args: tuple, kwargs: dict) -> Invoke: ...


class Envoy:
    """Stands for one module at `path` inside traces."""

    # No __slots__: a child envoy, once found, is cached in the instance __dict__ so the
    # next `net.layers` is a plain attribute hit (properties like `.output` still win).

    def __init__(self, module: torch.nn.Module, path: str, aliases: Aliases | None = None,
                 lister: Lister | None = None) -> None:
        """`lister(path)`: the `.source` operations of the module at `path`, where the model
        can list them outside a trace (a LanguageModel; tracing/source.py)."""
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_aliases", aliases)
        object.__setattr__(self, "_lister", lister)

    # --- the tree ------------------------------------------------------------------------
    def _child(self, name: str) -> Envoy:
        child = self._children.get(name)
        if child is None:
            module = self._module._modules[name]
            path = f"{self._path}.{name}" if self._path else name
            child = self._children[name] = Envoy(module, path, self._aliases, self._lister)
        return child

    def __getattr__(self, name: str) -> Any:
        module = self._module
        if name in module._modules:
            child = self.__dict__[name] = self._child(name)
            return child
        aliases = self._aliases
        if aliases is not None and not name.startswith("__"):
            found = aliases.resolve(self, name)
            if found is not None:
                self.__dict__[name] = found
                return found
        if name in module._parameters or name in module._buffers:
            path = f"{self._path}.{name}" if self._path else name
            return current_tracer(f"`{path}`").record(PARAM, (path,))
        if name.startswith(("__", "_ipython_")):  # Jupyter probes `_ipython_canary_...`
            raise AttributeError(name)
        try:
            return getattr(module, name)
        except AttributeError:
            raise TraceError(
                f"{type(module).__name__} at `{self._path or '<root>'}` has no submodule or "
                f"attribute {name!r}; submodules: {', '.join(module._modules) or 'none'}",
                user_where(),
            ) from None

    def __getitem__(self, index: int) -> Envoy:
        child = self._children.get(index)  # ints key the same cache as names
        if child is not None:
            return child
        names = list(self._module._modules)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TraceError(f"index modules with an int, got {index!r}", user_where())
        if not -len(names) <= index < len(names):
            raise TraceError(
                f"`{self._path or '<root>'}` has {len(names)} submodules (0..{len(names) - 1}); "
                f"index {index} is out of range",
                user_where(),
            )
        child = self._children[index] = self._child(names[index])
        return child

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Any:
        return (self._child(n) for n in self._module._modules)

    def __repr__(self) -> str:
        return repr(self._module)

    def _repr_html_(self) -> str | None:
        """Jupyter: this module's subtree, collapsible (nnglass[viz]; else the plain repr)."""
        try:
            from ..viz import module_tree
        except ModuleNotFoundError:
            return None
        return module_tree(self).text

    # --- sites ---------------------------------------------------------------------------
    @property
    def source(self) -> Any:
        """The operations inside this module's forward (`.source.softmax_0.output`: the
        attention probabilities under eager attention); `print(module.source)` lists them.
        A submodule named `source` still wins (`module.source` is that submodule)."""
        if "source" in self._module._modules:
            return self._child("source")
        from .source import Source

        return Source(self)

    def call(self, i: int) -> SiteCall:
        """The module's i-th call (0-based) in the current step."""
        if not isinstance(i, int) or i < 0:
            raise TraceError(f"call index must be an int >= 0, got {i!r}", user_where())
        return SiteCall(self, i)

    def skip(self, value: Any) -> None:
        """nnsight's `module.skip(value)`: the module's output (first call) is `value`, as
        if its forward had returned it, and the forward does not run (nor anything inside
        it: reading an inner site is an error). Inside one invoke of several, the forward
        runs for the other rows and this invoke's rows are replaced, like a setter."""
        current_tracer("`.skip()`").record_site(SET, self._path, "output", 0, value, skip=True)

    @property
    def output(self) -> Proxy:
        """Exactly what the module's forward returned in its first call (a tuple stays a tuple)."""
        return current_tracer("`.output`").record_site(GET, self._path, "output", 0)

    @output.setter
    def output(self, value: Any) -> None:
        SiteCall(self, 0).output = value

    input = property(lambda self: SiteCall(self, 0).input,
                     lambda self, v: setattr(SiteCall(self, 0), "input", v))
    inputs = property(lambda self: SiteCall(self, 0).inputs,
                      lambda self, v: setattr(SiteCall(self, 0), "inputs", v))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)
        elif name in self._module._modules:
            raise TraceError(f"cannot replace submodule {name!r} inside a trace", user_where())
        else:
            raise TraceError(f"cannot set attribute {name!r} of a module inside a trace; set "
                             "`.output`, `.input` or `.inputs`", user_where())

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Run this module on traced values (e.g. `net.head(h)` for a logit lens)."""
        tracer = current_tracer(f"calling `{self._path}`")
        return tracer.record(MODULE, (self._path, *args), kwargs)

    def at(self, path: str) -> Envoy:
        """The envoy of the module at a dotted path below this one."""
        envoy = self
        for name in path.split(".") if path else ():
            envoy = envoy._child(name)
        return envoy

    def inputs_pair(self) -> Proxy:
        """`.inputs` as one proxy of the (args, kwargs) pair (what the cache saves)."""
        return current_tracer("`.inputs`").record_site(GET, self._path, "inputs", 0)


class Aliases:
    """`rename=`: other names for modules (nnsight's aliases). A dotted key ("transformer.h")
    names a path, reachable under its alias from the root (`net.layers`); a plain key
    ("self_attn") is a child's name, reachable under its alias wherever such a child is
    (`layer.attn`). The real names keep working, and graphs hold only real paths, so a
    server never needs the aliases."""

    def __init__(self, root: torch.nn.Module, rename: dict[str, str]) -> None:
        self.paths: dict[str, str] = {}  # alias at the root -> real path
        self.names: dict[str, str] = {}  # alias of a child -> its real name
        for real, alias in rename.items():
            if not isinstance(real, str) or not isinstance(alias, str) or not alias.isidentifier():
                why = f"rename maps module paths to names: {real!r}: {alias!r} is not one"
                raise TraceError(why, user_where())
            if "." in real:
                try:
                    root.get_submodule(real)
                except AttributeError:
                    raise TraceError(f"rename: the model has no module at `{real}`", user_where()) from None
                self.paths[alias] = real
            else:
                self.names[alias] = real

    def resolve(self, envoy: Envoy, name: str) -> Envoy | None:
        if not envoy._path and name in self.paths:
            return envoy.at(self.paths[name])
        real = self.names.get(name)
        if real is not None and real in envoy._module._modules:
            return envoy._child(real)
        return None


class CallSites:
    """`.output`, `.input`, `.inputs` of one call at one site path: read as proxies, set as
    edits. `SiteCall` (a module's call) and `source.Operation` (an operation inside one)
    say which path and call."""

    __slots__ = ()

    def _site(self) -> tuple[str, int]:  # (site path, call index)
        raise NotImplementedError

    def _label(self) -> str:  # how messages name this call, before `.output` ("": a module's)
        raise NotImplementedError

    def _get(self, kind: str) -> Proxy:
        path, call = self._site()
        return current_tracer(f"`{self._label()}.{kind}`").record_site(GET, path, kind, call)

    @property
    def output(self) -> Proxy:
        """Exactly what the call returned (a tuple stays a tuple)."""
        return self._get("output")

    @property
    def input(self) -> Proxy:
        """The first positional argument, else the first forward parameter given by keyword."""
        return self._get("input")

    @property
    def inputs(self) -> tuple[Proxy, Proxy]:
        """(args, kwargs) of the call."""
        both = self._get("inputs")
        return both[0], both[1]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("output", "input", "inputs"):
            on = f"`{self._label()}`" if self._label() else "a module call"
            raise TraceError(f"cannot set {name!r} on {on}; set `.output`, `.input` or `.inputs`",
                             user_where())
        if name == "inputs" and not (isinstance(value, tuple) and len(value) == 2):
            raise TraceError("`.inputs` must be set to an (args, kwargs) pair", user_where())
        path, call = self._site()
        current_tracer(f"setting `{self._label()}.{name}`").record_site(SET, path, name, call, value)


class SiteCall(CallSites):
    """One call of one module."""

    __slots__ = ("call_index", "envoy")

    def __init__(self, envoy: Envoy, call_index: int) -> None:
        object.__setattr__(self, "envoy", envoy)
        object.__setattr__(self, "call_index", call_index)

    def _site(self) -> tuple[str, int]:
        return self.envoy._path, self.call_index

    def _label(self) -> str:
        return ""
