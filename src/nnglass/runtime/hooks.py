"""Hooks: the only place nnglass touches a model, and only for the length of one run.

Invariants:
- Hooks go only on modules the graph references, and every one is removed in a
  `finally`, also when the forward raises or stops early.
- A hook acts only for the run active in the current context (a context variable), so
  threads tracing the same model at once never see each other's interventions.
- `.source` sites (operations inside a forward) are hooks too: a pre-hook and an
  always-called forward hook on the module keep a per-thread TorchFunctionMode on while its
  forward runs (runtime/source.py); `uninstall` pops any an aborted forward left.
- `module.skip(v)` is the one place a run changes more than hooks: while some run may
  skip a module, its `forward` attribute is a dispatcher that returns `SKIPPED` for that
  run (its output hook then hands the model `v`) and calls the real forward for anyone
  else. The last run to leave puts the module's own `forward` back.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GraphError
from .source import close_modes, source_hooks, weight_storages
from .values import SKIPPED, only_input, unwrap

if TYPE_CHECKING:
    from .interpreter import Interpreter

ACTIVE: contextvars.ContextVar[Interpreter | None] = contextvars.ContextVar("nnglass_run", default=None)


_PATHS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]] = weakref.WeakKeyDictionary()


def find_module(model: torch.nn.Module, path: str, where: str = "") -> torch.nn.Module:
    if not path:
        return model
    paths = _PATHS.get(model)
    if paths is None:  # the root itself stays out: a value must not keep its weak key alive
        paths = _PATHS[model] = {p: m for p, m in model.named_modules() if p}
    module = paths.get(path)
    if module is None:  # the tree may have changed since it was indexed
        try:
            module = paths[path] = model.get_submodule(path)
        except AttributeError:
            raise GraphError(f"the model has no module at `{path}`", where) from None
    return module


def _first_keyword_input(module: torch.nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _pre_hook(interp: Interpreter, path: str, kinds: set[str], params: list[str], hide: bool) -> Any:
    # `*rest`: another thread may call this hook while torch is still registering or
    # removing it, when torch's with_kwargs flag and hook table disagree for a moment.
    # Such a call is never for this run (ACTIVE differs), so it returns None either way.
    def hook(module: torch.nn.Module, args: tuple, *rest: Any) -> Any:
        if ACTIVE.get() is not interp or interp.suspended:
            return None
        kwargs = rest[0]
        new_args, new_kwargs = args, kwargs
        if "inputs" in kinds:
            pair = only_input(args, kwargs, params) if hide else (args, kwargs)
            new = interp.fire(path, "inputs", pair)
            if new is not pair:  # a setter, or a copy: the model's own objects, opaque no more
                new_args, new_kwargs = unwrap(new)
                new_args = tuple(new_args)
        if "input" in kinds:
            if new_args:
                new_args = (interp.fire(path, "input", new_args[0]), *new_args[1:])
            else:
                name = next((p for p in params if p in new_kwargs), None)
                if name is None:
                    interp.fire(path, "input", None)
                else:
                    new_kwargs = {**new_kwargs, name: interp.fire(path, "input", new_kwargs[name])}
        if new_args is args and new_kwargs is kwargs:
            return None
        return new_args, new_kwargs

    return hook


def _forward_hook(interp: Interpreter, path: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if ACTIVE.get() is not interp or interp.suspended:
            return None
        new = interp.fire(path, "output", output)
        return None if new is output else new

    return hook


_KEYS = itertools.count(-1, -1)  # hook-table keys of our own: torch's handles count up from 0


def install(model: torch.nn.Module, interp: Interpreter) -> list[tuple[dict, int, dict | None]]:
    """Install the run's hooks and make it the active run in this context; `uninstall`
    undoes both (call it in a `finally`).

    Hooks go straight into the module's hook tables (what `register_forward_hook` does,
    without a RemovableHandle: ~1.5 µs a hook saved), under a negative key torch never uses.
    """
    installed: list[tuple[dict, int, dict | None]] = []
    interp.active_token = ACTIVE.set(interp)
    key = next(_KEYS)
    try:
        if interp.plan.skipped:
            installed.append((_SKIP_TABLE, 0, None))
            for path in interp.plan.skipped:
                _start_skipping(find_module(model, path, interp.plan.site_where[path]), interp, path)
        if interp.plan.source_specs:
            # First among the module's hooks: the mode is on before its input hook runs
            # and off before its output hook (their nodes' torch calls are not counted anyway).
            weights = weight_storages(model) if interp.hide_weights else None
            for path, wanted in interp.plan.source_specs.items():
                module = find_module(model, path, interp.plan.site_where[path])
                pre, post = source_hooks(interp, path, wanted, weights)
                module._forward_pre_hooks[key] = pre
                installed.append((module._forward_pre_hooks, key, None))
                module._forward_hooks_always_called[key] = True  # also when the forward raises
                module._forward_hooks[key] = post
                installed.append((module._forward_hooks, key, module._forward_hooks_always_called))
            key = next(_KEYS)  # the module's own hooks below go under another key
        for path, pre, out in interp.plan.hook_specs:
            module = find_module(model, path, interp.plan.site_where[path])
            if pre:
                hide = interp.hide_weights and "inputs" in pre
                params = _first_keyword_input(module) if "input" in pre or hide else []
                module._forward_pre_hooks_with_kwargs[key] = True  # flag first: no window without it
                module._forward_pre_hooks[key] = _pre_hook(interp, path, pre, params, hide)
                installed.append((module._forward_pre_hooks, key, module._forward_pre_hooks_with_kwargs))
            if out:
                module._forward_hooks[key] = _forward_hook(interp, path)
                installed.append((module._forward_hooks, key, None))
    except BaseException:
        uninstall(interp, installed)
        raise
    return installed


def uninstall(interp: Interpreter, installed: list[tuple[dict, int, dict | None]]) -> None:
    for table, key, flags in installed:
        if table is _SKIP_TABLE:
            _stop_skipping(interp)
            continue
        table.pop(key, None)
        if flags is not None:
            flags.pop(key, None)
    close_modes(interp)
    ACTIVE.reset(interp.active_token)


# --- module.skip(v): a forward that does not run ----------------------------------------------
_SKIP_TABLE: dict = {}  # marks a skip entry in `installed`
_SKIP_LOCK = threading.Lock()
_NO_FORWARD = object()
# module -> (the runs that may skip it, by path; its own instance-level forward, if any)
_SKIPPING: weakref.WeakKeyDictionary[torch.nn.Module, tuple[dict[Interpreter, str], Any]] = \
    weakref.WeakKeyDictionary()
_SKIPPED_BY: weakref.WeakKeyDictionary[Interpreter, list[torch.nn.Module]] = weakref.WeakKeyDictionary()


def _start_skipping(module: torch.nn.Module, interp: Interpreter, path: str) -> None:
    with _SKIP_LOCK:
        entry = _SKIPPING.get(module)
        if entry is None:
            runs: dict[Interpreter, str] = {}
            entry = _SKIPPING[module] = (runs, module.__dict__.get("forward", _NO_FORWARD))
            module.forward = _dispatcher(runs, module.forward)
        entry[0][interp] = path
        _SKIPPED_BY.setdefault(interp, []).append(module)


def _stop_skipping(interp: Interpreter) -> None:
    with _SKIP_LOCK:
        for module in _SKIPPED_BY.pop(interp, ()):
            runs, own = _SKIPPING[module]
            runs.pop(interp, None)
            if not runs:
                del _SKIPPING[module]
                if own is _NO_FORWARD:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = own


def _dispatcher(runs: dict[Interpreter, str], forward: Any) -> Any:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        interp = ACTIVE.get()
        path = runs.get(interp) if interp is not None else None
        if path is not None and not interp.suspended and interp.skips_forward(path):
            return SKIPPED
        return forward(*args, **kwargs)

    return dispatch
