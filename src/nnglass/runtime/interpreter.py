"""The Interpreter: runs a graph interleaved with the model's forward pass.

Execution is dataflow, driven by the model: a hook `fire`s a site, the site's get/set
nodes run in program order, and every node whose inputs are ready runs at once (lowest
id first), so each value is computed as early as the forward pass allows and dropped
when nothing needs it. `run` is one whole run: hooks on, the model's forward, hooks
off, every node checked. Subclasses override the per-node methods (`run_node`, `call_op`,
`call_module`, `read_param`, `backward`, `complete`): `runtime.limited.LimitedInterpreter`
is the one that checks sizes and time; the gradient part (`.grad`, `backward`) is in
runtime/gradients.py. One `RunConfig`, given at construction, is all
that configures a run; on a tensor-parallel model its `sites` (runtime/shards.py) is the
one seam where shards become whole tensors (a site's value, a module call, a parameter).

Invariants:
- Hooks see the model's tensors; setters never mutate a tensor held elsewhere (a site
  that is edited in place is copied first; `set` replaces rather than writes into).
- Saved values are snapshots (detached copies taken when the node completes).
- Backward computes gradients only for the sites the graph asked for: it uses
  `torch.autograd.grad`, which never accumulates into any `.grad`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ExecutionError, NNglassError, TimeLimitError
from ..graph.ir import (
    ALL_STEPS,
    BACKWARD,
    GENERATE,
    GET,
    IMPORT,
    MODULE,
    PARAM,
    TRACE,
    Graph,
    Node,
)
from .finish import check_finished, culprit, model_error, out_of_order
from .gradients import Gradients
from .hooks import install, uninstall
from .limits import PLAIN_RUN, RunConfig
from .plan import Plan, SiteKey, SiteTask
from .values import (
    UNSET,
    copy_tensors,
    graph_view,
    map_batch,
    opaque_in,
    resolve,
    snapshot,
    tensor_leaves,
    unwrap,
    without_state,
    zip_batch,
)
from .window import Window

if TYPE_CHECKING:
    from .order import OrderLog
    from .shards import SiteLayouts


class EarlyStop(BaseException):
    """Raised from a hook once nothing more is needed from the forward pass."""


class Interpreter(Gradients):
    """Runs one graph against one model. Create one per run."""

    def __init__(self, plan: Plan, graph: Graph, model: torch.nn.Module, rows: list[tuple[int, ...]],
                 batch_size: int, config: RunConfig = PLAIN_RUN,
                 imports: dict[tuple[int, int], Any] | None = None) -> None:
        self.config = config
        self.plan = plan
        self.graph = graph
        self.nodes = graph.nodes
        self.model = model
        self.tensors = graph.tensors
        self.rows = [Window(*r) for r in rows]  # invoke index -> its rows (and positions: window.py)
        self.batch_size = batch_size
        self.can_stop = config.can_stop
        self.imports = imports or {}
        n = len(self.nodes)
        self.values: list[Any] = [UNSET] * n
        self.remaining = [len(d) for d in plan.deps]
        self.left = n  # nodes not yet run
        self.saved: dict[int, Any] = {}
        self.step = 0
        self.calls: dict[tuple[str, str], int] = {}
        self.suspended = 0  # > 0 while a `module` node runs a module: hooks pass through
        self.fired: list[SiteKey] = []
        self._ready: list[int] = []
        self._grad_hooks: list[Any] = []
        self._grad_pending: dict[int, torch.Tensor] = {}  # get node -> tensor awaiting grad
        self._in_backward = False
        self._deferred: list[int] = []  # backward nodes waiting for the running one
        self.last_edit = -1  # the last set/in-place node that ran (for model errors)
        self.current = -1  # the node running now (-1: none): whose failure a run's error is
        self.deadline = config.limits.deadline()  # time.monotonic() after which every hook stops the run
        self.seconds = config.limits.seconds  # the time limit, for the message
        self.hide_weights = config.limits.hide_weights  # `.inputs` shows only `.input` (see hooks)
        self.active_token: Any = None  # set by hooks.install: this run is active in its context
        self.source_modes: list[Any] = []  # runtime/source.py: the modes of forwards now running
        self._merged: dict[SiteKey, SiteTask] = {}  # step-k + every-step tasks, merged once
        # Saved values are snapshots. Copying each costs time and memory, so a plain trace
        # saves references and watches their version counters: if anything (the model's own
        # in-place ops, a later edit) changed one, the run is repeated with copies.
        self.copy_saves = (config.copy_saves or plan.max_step > 0 or bool(plan.all_steps)
                           or graph.mode != TRACE)
        self._watched: list[tuple[torch.Tensor, int]] = []

    # --- one run ---------------------------------------------------------------------------
    def run(self, forward: Callable[[Interpreter], Any], order: OrderLog | None = None) -> dict[int, Any]:
        """Hooks on, `forward(self)` (the model's forward or generate), hooks off, every node
        checked; the saved values by node id. If a saved tensor changed after it was saved
        (a ReLU(inplace=True) after the hooked module), the run is repeated on a fresh
        interpreter that copies each save, and `order` remembers that this model does that.
        A failure names its node (`e.node_id`: in a shared pass, whose job it is)."""
        try:
            installed = install(self.model, self)
            try:
                self.start()
                try:
                    # Without a backward nothing can use the autograd graph (saved values are
                    # detached): don't build it. Same numbers, less time and memory.
                    with torch.enable_grad() if self.plan.has_backward else torch.no_grad():
                        forward(self)
                except EarlyStop:
                    pass
                except NNglassError:
                    raise
                except Exception as e:
                    raise model_error(self, e) from e
            finally:
                uninstall(self, installed)
            if order is not None:
                order.record(self.fired)
            check_finished(self, missing_steps_ok=self.graph.mode == GENERATE)
            if not self.copy_saves and self.saves_changed():
                if order is not None:
                    order.edits_outputs = True
                again = replace(self.config, copy_saves=True)
                return type(self)(self.plan, self.graph, self.model, self.rows, self.batch_size, again,
                                  self.imports).run(forward, order)
            return self.saved
        except BaseException as e:
            e.node_id = culprit(self, e)  # type: ignore[attr-defined]
            raise
        finally:
            self.close()

    # --- driving ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.plan.starters:
            self._ready.extend(self.plan.starters)
            heapq.heapify(self._ready)
            self.drain()

    def next_step(self) -> None:
        """A new generation step: call counters restart, every-step nodes run again."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeLimitError(f"the run went past its time limit of {self.seconds:g} s")
        self.step += 1
        self.calls.clear()
        for i in self.plan.all_steps:
            if self.values[i] is not UNSET:
                self.values[i] = UNSET
                self.left += 1
            self.remaining[i] = sum(1 for d in self.plan.deps[i] if self.values[d] is UNSET)
            if not self.remaining[i] and self.plan.runnable[i]:
                heapq.heappush(self._ready, i)
        self.drain()

    def fire(self, path: str, kind: str, value: Any) -> Any:
        """A hook reached (path, kind): run that site's nodes; return the value to use."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeLimitError(f"the run went past its time limit of {self.seconds:g} s")
        ck = (path, kind)
        call = self.calls.get(ck, 0)
        self.calls[ck] = call + 1
        return self.fire_site((path, kind, call, self.step), value)

    def skips_forward(self, path: str) -> bool:
        """Does `module.skip(v)` replace the next output of `path` for every row? Then its
        forward (and everything inside it) need not run. A skip of some invokes' rows
        only lets the forward run and replaces those rows, like any setter."""
        key = (path, "output", self.calls.get((path, "output"), 0), self.step)
        task = self._with_every_step(key, self.plan.tasks.get(key)) if self.plan.all_steps else \
            self.plan.tasks.get(key)
        if task is None or not task.skips:
            return False
        return len(self.rows) == 1 or any(self.nodes[i].invoke is None for i in task.skips)

    def fire_result(self, value: Any) -> Any:
        """Generation finished: `tracer.result` nodes see the generated ids."""
        return self.fire_site(("", "result", 0, 0), value)

    def fire_site(self, key: SiteKey, value: Any) -> Any:
        task = self.plan.tasks.get(key)
        if self.plan.all_steps:
            task = self._with_every_step(key, task)
        if task is None:
            return value
        if task.copy:
            value = copy_tensors(value)
        sites = self.config.sites
        if sites is not None and sites.sharded(key[0], key[1]):
            return self._fire_shard(sites, key, task, value)
        return self._fire_task(key, task, value)

    def _fire_shard(self, sites: SiteLayouts, key: SiteKey, task: SiteTask, local: Any) -> Any:
        """A site where the model holds this rank's shard: the graph sees the whole tensor,
        and an edit goes back to the model as this rank's slice of the edited whole (and,
        where a gradient is watched, the model always continues from that slice)."""
        if task.grads:  # the model continues from the whole tensor, so its gradient reaches it
            value = self._fire_task(key, task, sites.whole(key[0], key[1], local, grad=True))
            return sites.local(key[0], key[1], value, grad=True)
        whole = sites.whole(key[0], key[1], local)
        value = self._fire_task(key, task, whole)
        if value is whole and not task.inplace:
            return local
        return sites.local(key[0], key[1], value)

    def _fire_task(self, key: SiteKey, task: SiteTask, value: Any) -> Any:
        self.fired.append(key)
        nodes, remaining = self.nodes, self.remaining
        whole = len(self.rows) == 1
        watched = ()
        for i in task.ids:
            self.current = i
            if remaining[i]:
                out_of_order(self, nodes[i])
            node = nodes[i]
            if node.op == GET:
                if task.grads and i in task.grads and i > task.last_set and not task.inplace:
                    # Watch the gradient before anything reads the value: a backward that
                    # the nodes below run inside this very hook must already find it.
                    value = self._watch_grad(i, value)
                    watched = (*watched, i)
                seen = graph_view(without_state(value) if not key[0] else value)
                self.complete(i, seen if whole or node.invoke is None else self._slice(seen, node.invoke))
            else:
                value = self._replace(value, unwrap(self.values_of(node.args[0])), node.invoke)
                self.complete(i, None)
            if self._ready:
                self.drain()
        self.current = -1
        values = self.values
        for i in task.inplace:
            if values[i] is UNSET:
                out_of_order(self, nodes[i])
            self.last_edit = i
        if task.last_set >= 0:
            self.last_edit = task.last_set
        for i in task.escapes:
            # A view of the model's memory that a later node still needs: the model may
            # edit that memory in place (e.g. ReLU(inplace=True)) once the hook returns.
            v = values[i]
            if v is not UNSET:
                for c in self.plan.consumers[i]:
                    if values[c] is UNSET:
                        values[i] = copy_tensors(v)
                        break
        for i in task.grads:
            if i not in watched:
                value = self._watch_grad(i, value)
        if self.left == 0 and self.can_stop:
            raise EarlyStop
        return value

    def _with_every_step(self, key: SiteKey, task: SiteTask | None) -> SiteTask | None:
        """Merge a site's step-k task with its every-step (`tracer.all()`) task."""
        every = self.plan.tasks.get((*key[:3], ALL_STEPS))
        if every is None or key[3] == ALL_STEPS:
            return task
        if task is None:
            return every
        merged = self._merged.get(key)
        if merged is None:
            merged = self._merged[key] = task.merged(every)
        return merged

    def values_of(self, arg: Any) -> Any:
        return resolve(arg, self.values, self.tensors)

    # --- completing nodes -----------------------------------------------------------------
    def complete(self, i: int, value: Any) -> None:
        self.values[i] = value
        self.left -= 1
        node = self.nodes[i]
        if node.save:
            # A parameter outlives the run (and may be trained later): a saved one is a copy.
            copy = (self.copy_saves and i not in self.plan.final) or i in self.plan.weights
            try:
                snap = snapshot(value, copy=copy)
            except TypeError as e:
                raise ExecutionError(str(e), node.where) from None
            if not copy:
                self._watched.extend((t, t._version) for t in tensor_leaves(snap))
            if node.step == ALL_STEPS:
                self.saved.setdefault(i, []).append(snap)
            else:
                self.saved[i] = snap
        remaining, runnable = self.remaining, self.plan.runnable
        for c in self.plan.consumers[i]:
            remaining[c] -= 1
            if not remaining[c] and runnable[c]:
                heapq.heappush(self._ready, c)

    def drain(self) -> None:
        ready = self._ready
        while ready:
            i = heapq.heappop(ready)
            if self.values[i] is not UNSET:
                continue
            node = self.nodes[i]
            if node.op == BACKWARD and self._in_backward:
                self._deferred.append(i)  # one backward at a time; runs when this one ends
                continue
            self.current = i
            try:
                value = self.run_node(node)
            except (NNglassError, EarlyStop):
                raise
            except Exception as e:
                raise self._node_error(node, e) from e
            self.complete(i, value)
        self.current = -1

    def run_node(self, node: Node) -> Any:
        op = node.op
        args = resolve(node.args, self.values, self.tensors)
        kwargs = resolve(node.kwargs, self.values, self.tensors) if node.kwargs else {}
        if op == MODULE:
            return self.call_module(args[0], args[1:], kwargs)
        if op == PARAM:
            return self.read_param(args[0])
        if op == BACKWARD:
            return self.backward(node, *args, **kwargs)
        if op == IMPORT:
            return self.imports[args]
        return self.call_op(node, self.plan.fns[node.id], args, kwargs)

    # --- per-node behaviour (override to scan or check) ----------------------------------
    def call_op(self, node: Node, fn: Any, args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)

    def call_module(self, path: str, args: tuple, kwargs: dict) -> Any:
        self.suspended += 1
        try:
            module = self.model.get_submodule(path)
            if self.config.sites is not None:
                return graph_view(self.config.sites.call(path, module, args, kwargs))
            return graph_view(module(*args, **kwargs))
        finally:
            self.suspended -= 1

    def read_param(self, path: str) -> Any:
        module_path, _, name = path.rpartition(".")
        module = self.model.get_submodule(module_path)
        value = module._parameters.get(name)
        if value is None:
            value = module._buffers[name]
        if self.config.sites is not None:
            value = self.config.sites.param(value)
        return value.detach()

    # --- invokes -----------------------------------------------------------------------
    def _slice(self, value: Any, invoke: int | None) -> Any:
        if invoke is None or len(self.rows) == 1:
            return value
        return map_batch(value, self.batch_size, self.rows[invoke].view)

    def _replace(self, value: Any, new: Any, invoke: int | None) -> Any:
        if invoke is None or len(self.rows) == 1:
            return new
        return zip_batch(value, new, self.batch_size, self.rows[invoke].put)

    # --- errors --------------------------------------------------------------------------
    def _node_error(self, node: Node, e: Exception) -> ExecutionError:
        state = opaque_in((self.values_of(node.args), self.values_of(node.kwargs)))
        if state is not None:
            return ExecutionError(
                f"`{node.op}` was given {state.why}: a graph can pass it along but never look inside "
                "it (read tensors, e.g. a module's `.output`)",
                node.where)
        return ExecutionError(f"{type(e).__name__}: {e}", node.where)

    def saves_changed(self) -> bool:
        """Whether a saved value (kept by reference) was edited in place after it was saved."""
        return any(t._version != v for t, v in self._watched)

    def unfinished(self) -> list[Node]:
        return [n for n in self.nodes if self.values[n.id] is UNSET]
