"""Refuse a graph that breaks its model's exposure policy, before anything runs.

Invariant: `check_policy` accepts a graph only if every node stays inside the policy:
reads (`get` of a module's input/inputs/output) match a `read` glob, writes (`set`) a
`write` glob, every site names a module that exists (or, for a `.source` site such as
`model.layers.0.self_attn.source.softmax_0`, an operation the module's forward makes, as
the worker measured; globs match it as a path like any other, so `model.layers.*.self_attn`
does not expose it and `model.layers.*.self_attn.source.*` does), gradients (`grad`, `set_grad`,
`backward`) only when `gradients` is on, parameters (`param`) only when weights are
visible, module calls on graph values only when `module_calls` is on *and* weights are
visible, and the graph stays within the limits (nodes, prompt tokens, new tokens). The
generated ids (`tracer.result`) are always readable. Refusals are `PolicyError`s naming
the node's op, its site, what the policy forbids, what it allows, and the user's line.

What "weights hidden" does and does not protect. It means no op can read a parameter
or buffer, no module can be called on a user-made tensor, no site whose value is a
lookup of the weights can be read (`server/exposure.py`: the embedding's output, the
first block's input, ... unless `expose_embeddings`), and `.inputs` shows only the
value `.input` reads (the runtime makes every other argument opaque; model state such
as a KV cache is opaque to every graph, whatever the policy). It does not make the
weights secret by itself: reading both sides of a linear map over many prompts (the
input and output of `q_proj`, of an MLP's `down_proj`, or of `lm_head`) lets anyone
solve for its weights by least squares, and *writing* the input while reading the
output makes it easier still (chosen inputs). To prevent that:

- never make both the input and the output of a linear layer readable (or writable on
  one side and readable on the other); e.g. allow only whole blocks' residual-stream
  outputs, `read = ["", "model.layers.*"]`, and not `"**"` or `"model.layers.*.*"`;
- keep `gradients = false`: gradients w.r.t. activations are products with the
  transposed weights and leak them just as well;
- keep `module_calls = false` (it is refused anyway while weights are hidden).

Even then some leakage is inherent: the last block's output and the logits are the two
sides of the final norm and `lm_head`, so together they reveal `lm_head` (scaled by the
norm's weight) by regression, and logits alone reveal the unembedding's span over many
queries (Carlini et al., 2024, "Stealing Part of a Production Language Model"). Leave
the last block out of `read`/`write` if that matters. Model options that widen what the
root output carries (`output_hidden_states`, `output_attentions`, `use_cache`, ...) and
reading the output's `past_key_values` are allowed only when every module is readable.

What counts as a write comes from `graph.analysis` (what each op edits, what each value
shares memory with): the same analysis the runtime's plan runs by, so an in-place edit the
policy did not see as a write cannot happen.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, NoReturn

from ..errors import PolicyError
from ..graph.analysis import analyze
from ..graph.ir import (
    BACKWARD,
    FORWARD_KWARGS,
    GENERATE,
    GENERATE_KWARGS,
    GET,
    GRAD,
    IMPORT,
    MODULE,
    PARAM,
    SESSION,
    SET,
    SET_GRAD,
    Graph,
    Node,
    Site,
    TensorRef,
    path_name,
)
from ..graph.source import SOURCE_KINDS, SourceOp, source_path
from ..graph.source import split as split_source
from .config import Policy

# Options that make the root output carry other modules' values (every layer's hidden
# state, attention patterns, the KV cache: keys and values are linear maps of inputs).
_WIDER = ("output_hidden_states", "output_attentions", "output_router_logits")
EXPOSING_OPTIONS = {FORWARD_KWARGS: (*_WIDER, "use_cache"),
                    GENERATE_KWARGS: (*_WIDER, "return_dict_in_generate")}
EXPOSING_ATTRIBUTES = ("past_key_values", "hidden_states", "attentions")

def match(pattern: str, path: str) -> bool:
    """Does a glob match a dotted module path? Per component: `*` is exactly one, `**`
    zero or more; "" (the root) is matched only by "" or "**"."""
    if pattern == "**":
        return True
    if pattern == "" or path == "":
        return pattern == path
    pat, parts = pattern.split("."), path.split(".")
    # reach[j]: the pattern so far can match parts[:j] (a DP, no backtracking blowup).
    reach = [True] + [False] * len(parts)
    for p in pat:
        if p == "**":
            for j in range(1, len(reach)):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [reach[j] and (p == "*" or p == parts[j]) for j in range(len(parts))]
    return reach[-1]


def matches_any(patterns: list[str], path: str) -> bool:
    return any(match(p, path) for p in patterns)


def check_policy(graph: Graph, policy: Policy, module_paths: set[str],
                 lookups: frozenset[tuple[str, str]] | None = None) -> None:
    """Raise `PolicyError` at the first node (or limit) the policy forbids.

    module_paths: the model's `named_modules()` paths (the root "" is implied).
    lookups: (path, "input" | "output") sites whose value is a lookup of weights
    (`server.exposure.lookup_sites`); unreadable while weights are hidden, unless the
    policy sets `expose_embeddings`.
    """
    paths, modules = _names(frozenset(module_paths))
    nodes = sum(len(g.nodes) for g in _traces(graph))
    if nodes > policy.limits.graph_nodes:
        raise PolicyError(f"the graph has {nodes} nodes; model {graph.model!r} allows at most "
                          f"{policy.limits.graph_nodes} per request: split the work into several requests")
    traces = graph.children if graph.mode == SESSION else [graph]
    if any(t.children for t in traces) or (graph.children and graph.mode != SESSION):
        raise PolicyError("only a session may hold traces, and only one level deep")
    earlier: list[_Check] = []
    for trace in traces:
        check = _Check(trace, policy, paths, modules, earlier, lookups or frozenset())
        check.run()
        earlier.append(check)


@functools.lru_cache(maxsize=16)
def _names(module_paths: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """What a site may name (the modules' paths, the root, the `.source` operations a worker
    measured) and what `module`/`param` may name (modules only). Once per set of paths, not
    per submission: splitting ~500 paths was most of a small graph's check."""
    paths = module_paths | {""}
    return paths, frozenset(p for p in paths if split_source(p) is None)


def _traces(graph: Graph) -> Iterator[Graph]:
    stack = [graph]
    while stack:
        g = stack.pop()
        stack.extend(reversed(g.children))
        yield g  # a session's own nodes and invokes are empty


class _Check:
    """One trace against the policy: options and limits first, then node by node."""

    def __init__(self, graph: Graph, policy: Policy, paths: frozenset[str], modules: frozenset[str],
                 earlier: list[_Check], lookups: frozenset[tuple[str, str]]) -> None:
        self.graph, self.policy, self.paths, self.earlier = graph, policy, paths, earlier
        self.modules = modules  # what `module`/`param` may name
        hidden = not (policy.weights_visible or policy.expose_embeddings)
        self.hidden_lookups = lookups if hidden else frozenset()
        self.model = graph.model
        self._all_readable: bool | None = None
        self.memory = analyze(graph)
        # Per node: the site values and parameters whose memory its value may share.
        self.aliases: list[frozenset[Site | str]] = []

    def run(self) -> None:
        self.check_tokens()
        self.check_options()
        for node in self.graph.nodes:
            self.check_node(node)
            self.check_writes(node)

    # --- the whole trace -------------------------------------------------------------------
    def check_tokens(self) -> None:
        limits, tokens = self.policy.limits, 0
        for inv in self.graph.invokes:
            ids = inv.kwargs.get("input_ids")
            if isinstance(ids, TensorRef) and ids.key in self.graph.tensors:
                tokens += math.prod(self.graph.tensors[ids.key].shape)
            elif ids is not None:
                tokens += _count_leaves(ids)
        if tokens > limits.prompt_tokens:
            raise PolicyError(f"the prompts of one trace hold {tokens} tokens; model {self.model!r} "
                              f"allows at most {limits.prompt_tokens}: use fewer or shorter prompts")
        if self.graph.mode != GENERATE:
            return
        gen = self.graph.options.get(GENERATE_KWARGS, {})
        new = gen.get("max_new_tokens") if isinstance(gen, dict) else None
        if type(new) is not int:
            raise PolicyError(f"generate needs an int max_new_tokens (at most {limits.new_tokens} on "
                              f"model {self.model!r}), got {new!r}")
        if new > limits.new_tokens:
            raise PolicyError(f"max_new_tokens={new} is over the limit of model {self.model!r}: at most "
                              f"{limits.new_tokens}")

    def check_options(self) -> None:
        for table, keys in EXPOSING_OPTIONS.items():
            opts = self.graph.options.get(table)
            if not isinstance(opts, dict):
                continue
            for key in keys:
                if opts.get(key) and not self.all_readable():
                    raise PolicyError(f"option {key}={opts[key]!r} exposes modules the policy of model "
                                      f"{self.model!r} keeps hidden; readable: {self.policy.read}")

    def all_readable(self) -> bool:
        if self._all_readable is None:
            self._all_readable = all(matches_any(self.policy.read, p) for p in self.paths)
        return self._all_readable

    # --- node by node ----------------------------------------------------------------------
    def check_node(self, node: Node) -> None:
        op, policy = node.op, self.policy
        if op == GET or op == SET:
            self.check_site(node, node.site, write=op == SET)
        elif op in (GRAD, SET_GRAD, BACKWARD):
            if not policy.gradients:
                self.refuse(node, f"gradients are off for model {self.model!r} (`.grad`, `.backward()`)")
            if op != BACKWARD:
                site = self.grad_site(node)  # its `get` was checked already; set_grad writes it
                self.check_site(node, site, write=False)
                if op == SET_GRAD:
                    self.check_site(node, site, write=True)
        elif op == PARAM:
            if not policy.weights_visible:
                self.refuse(node, f"parameter {node.args[0]!r}: weights of model {self.model!r} are hidden")
            owner = str(node.args[0]).rpartition(".")[0]
            if owner not in self.modules:
                self.refuse(node, f"no module at {owner!r} (parameter {node.args[0]!r})")
        elif op == MODULE:
            path = node.args[0]
            call = f"calling `{path_name(path)}` on your own values"
            if not policy.weights_visible:
                self.refuse(node, f"{call}: weights of model {self.model!r} are hidden, so module calls "
                            "are refused (they would expose the weights)")
            if not policy.module_calls:
                self.refuse(node, f"{call}: module calls are off for model {self.model!r}")
            if path not in self.modules:
                self.refuse(node, f"no module at {path!r} to call")
        elif op == IMPORT:
            pass  # an earlier trace's value, checked there
        elif op in ("builtins.getattr", "operator.getitem") and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, str) and name in EXPOSING_ATTRIBUTES and not self.all_readable():
                self.refuse(node, f"reading {name!r} exposes modules the policy of model {self.model!r} "
                            f"keeps hidden; readable: {policy.read}")

    def check_writes(self, node: Node) -> None:
        """An op that edits memory in place edits every site value or parameter its target
        may share memory with: that is a write to the site, and never allowed on a weight."""
        for alias in sorted(self.named(self.memory.edits[node.id]), key=str):
            if isinstance(alias, str):
                self.refuse(node, f"this edits parameter {alias!r} in place; parameters are read-only for "
                            "everyone: clone the weight first (w = ...weight.clone())")
            self.check_site(node, alias, write=True)
        self.aliases.append(self.named(self.memory.roots[node.id]))

    def named(self, roots: frozenset[int]) -> frozenset[Site | str]:
        """The site values and parameters behind alias roots (an import: the parameters its
        value shares in the earlier trace, which are still live memory)."""
        out: set[Site | str] = set()
        for r in roots:
            root = self.memory.nodes[r]
            if root.op == GET and root.site is not None:
                out.add(root.site)
            elif root.op == PARAM and root.args:
                out.add(str(root.args[0]))
            elif root.op == IMPORT and len(root.args) == 2:
                k, i = root.args
                if type(k) is int and 0 <= k < len(self.earlier) and type(i) is int:
                    shared = self.earlier[k].aliases
                    out.update(a for a in (shared[i] if 0 <= i < len(shared) else ()) if isinstance(a, str))
        return frozenset(out)

    def check_site(self, node: Node, site: Site | None, write: bool) -> None:
        if site is None:
            self.refuse(node, "a site op without a site")
        if site.kind == "result":
            if write:
                self.refuse(node, "the generated result cannot be written")
            return
        op = split_source(site.path)
        if op is not None:
            self.check_operation(node, site, op)
        elif site.path not in self.paths:
            self.refuse(node, f"no module at {site.path!r} in model {self.model!r}")
        patterns = self.policy.write if write else self.policy.read
        if not matches_any(patterns, site.path):
            verb = "writing" if write else "reading"
            allowed = ", ".join(repr(p) for p in patterns) or "nothing"
            self.refuse(node, f"{verb} `{site}` is not allowed by the policy of model "
                        f"{self.model!r}; {'writable' if write else 'readable'}: {allowed}")
        if not write and (site.path, "output" if site.kind == "output" else "input") in self.hidden_lookups:
            self.refuse(node, f"reading `{site}` would reveal the weights of model {self.model!r}: "
                        "its value is a lookup of them (one embedding row per token), and the weights are "
                        "hidden (the policy does not set expose_embeddings); read a later block instead")

    def check_operation(self, node: Node, site: Site, op: SourceOp) -> None:
        """A `.source` site: its module exists and its forward makes that call (as measured
        on the loaded model); under hidden weights, not inside a module whose input is a
        lookup of them (the first attention's scores are a function of token pairs alone)."""
        if op.module not in self.modules:
            self.refuse(node, f"no module at {path_name(op.module)!r} in model {self.model!r}")
        if site.kind not in SOURCE_KINDS:
            self.refuse(node, f"an operation has {', '.join(SOURCE_KINDS)}, not {site.kind!r}")
        if site.path not in self.paths:
            prefix = source_path(op.module, "")
            made = sorted(p[len(prefix):] for p in self.paths
                          if p.startswith(prefix) and "." not in p[len(prefix):])
            self.refuse(node, f"the forward of `{path_name(op.module)}` in model {self.model!r} makes no "
                        f"call {op.name!r} (as loaded on this server); it makes: {', '.join(made) or 'none'}")
        if (op.module, "input") in self.hidden_lookups:
            self.refuse(node, f"reading inside `{path_name(op.module)}` would reveal the weights of model "
                        f"{self.model!r}: its input is a lookup of them and the weights are hidden")

    def grad_site(self, node: Node) -> Site:
        """The site whose value `.grad` is of (through int indexing of a tuple output)."""
        target = self.memory.grad_targets.get(node.id)
        site = self.memory.nodes[target[0]].site if target is not None else None
        if site is None:
            self.refuse(node, "`.grad` is available only on a module's `.input`/`.output` (or an element "
                        "of a tuple output); take the gradient first, then index it")
        return site

    def refuse(self, node: Node, why: str) -> NoReturn:
        site = f" at `{node.site}`" if node.site is not None else ""
        raise PolicyError(f"node %{node.id} `{node.op}`{site}: {why}", where=node.where)


def _count_leaves(x: Any) -> int:
    count, stack = 0, [x]
    while stack:
        y = stack.pop()
        if isinstance(y, (list, tuple)):
            stack.extend(y)
        else:
            count += 1
    return count
