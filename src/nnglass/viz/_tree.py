"""A model's module tree as collapsible HTML, optionally marked with what a policy allows.

Invariant: one entry per module of `named_modules()` (remove_duplicate=False: a module
reachable by two paths is listed at both, as a site path names either), each carrying
its full dotted path (`data-path`, the name a graph and a policy use), its class name,
and its parameter count (`module.parameters()`, so tied weights count once per module).
With a policy, an entry is marked readable/writable exactly when the server's own glob
matcher (`nnglass.server.policy.match`) says so; the server may refuse more than the
globs do (with weights hidden, sites that are lookups of the embedding are refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._html import Html, count, escape

_STYLE = """<style>
.nng-tree{font-family:var(--jp-code-font-family,monospace);font-size:12px;line-height:1.5}
.nng-tree details>div,.nng-tree .nng-kids{margin-left:1.2em}
.nng-tree summary{cursor:pointer}
.nng-tree .nng-leaf{margin-left:1.1em}
.nng-tree .nng-class{color:#1f6feb}
.nng-tree .nng-params,.nng-tree .nng-extra{opacity:.65}
.nng-tree .nng-badge{border-radius:3px;padding:0 .3em;margin-left:.4em;font-size:10px}
.nng-tree .nng-read{background:rgba(46,160,67,.25)}
.nng-tree .nng-write{background:rgba(210,153,34,.3)}
.nng-tree .nng-closed{opacity:.5}
</style>"""


def _root(model: Any) -> tuple[torch.nn.Module, str, str]:
    """(module, its path, a title) for an NNModel/LanguageModel, an Envoy or a module."""
    if isinstance(model, torch.nn.Module):
        return model, "", type(model).__name__
    module = model.__dict__.get("_module")
    if not isinstance(module, torch.nn.Module):
        got = type(model).__name__
        raise TypeError(f"module_tree: expected an NNModel, an Envoy or a torch module, got {got}")
    path = model.__dict__.get("_path", "")
    return module, path, str(model.__dict__.get("name") or path or type(module).__name__)


def _globs(policy: Any) -> tuple[list[str], list[str]]:
    """`read` and `write` globs of a `Policy`, or of its summary (`GET /v1/models`)."""
    if isinstance(policy, Mapping):
        if "policy" in policy:  # a /v1/models entry: {"name": ..., "policy": {...}}
            policy = policy["policy"]
        return list(policy.get("read", [])), list(policy.get("write", []))
    return list(policy.read), list(policy.write)


def module_tree(model: Any, policy: Any = None, open_depth: int = 1) -> Html:
    """The module tree as collapsible HTML (display it in Jupyter, or `str()` it).

    model: an NNModel/LanguageModel (weights need not be loaded), an Envoy such as
    `lm.model.layers[0]`, or a torch module. policy: a server `Policy`, or its summary
    from `GET /v1/models`; each module is then marked read/write as its globs allow and
    modules neither readable nor writable are dimmed. open_depth: levels shown expanded.
    """
    module, path, title = _root(model)
    allows = None
    if policy is not None:
        from ..server.policy import matches_any  # the globs mean what the server enforces

        read, write = _globs(policy)
        allows = lambda p: (matches_any(read, p), matches_any(write, p))
    body = _entry(module, path, path.rsplit(".", 1)[-1] or title, 0, open_depth, allows)
    legend = ""
    if allows is not None:
        legend = ('<div>policy: <span class="nng-badge nng-read">R</span> readable '
                  '<span class="nng-badge nng-write">W</span> writable</div>')
    return Html(f'{_STYLE}<div class="nng-tree">{legend}{body}</div>')


def _entry(module: torch.nn.Module, path: str, name: str, depth: int, open_depth: int, allows: Any) -> str:
    n = sum(p.numel() for p in module.parameters())
    extra = module.extra_repr()
    parts = [
        f'<b>{escape(name)}</b>',
        f'<span class="nng-class">{escape(type(module).__name__)}</span>',
        f'<span class="nng-params">{count(n)} params</span>' if n else "",
        f'<span class="nng-extra">{escape(extra)}</span>' if extra and not module._modules else "",
    ]
    dim = ""
    if allows is not None:
        read, write = allows(path)
        parts.append('<span class="nng-badge nng-read" title="readable">R</span>' if read else "")
        parts.append('<span class="nng-badge nng-write" title="writable">W</span>' if write else "")
        dim = "" if read or write else " nng-closed"
    head = " ".join(p for p in parts if p)
    attrs = f'data-path="{escape(path)}" data-class="{escape(type(module).__name__)}" data-params="{n}"'
    label = f'title="{escape(path or "<root>")}"'
    if not module._modules:
        return f'<div class="nng-leaf{dim}" {attrs} {label}>{head}</div>'
    kids = "".join(
        _entry(child, f"{path}.{key}" if path else key, key, depth + 1, open_depth, allows)
        for key, child in module._modules.items()
        if child is not None
    )
    is_open = " open" if depth < open_depth else ""
    return (f'<details class="nng-module{dim}" {attrs}{is_open}><summary {label}>{head}</summary>'
            f'<div class="nng-kids">{kids}</div></details>')
