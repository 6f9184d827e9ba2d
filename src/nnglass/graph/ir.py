"""The intervention graph: a flat list of nodes in SSA order.

Invariants (the rest of nnglass relies on them):
- A node only refers to nodes with a smaller id (SSA order == program order).
- Arguments are plain data: literals, `Ref`s to earlier nodes, `TensorRef`s to
  attached tensors, and containers of those (list, tuple, dict with str keys, slice).
- `op` is one of the opcodes below or a name in the op registry. Nothing else.

Opcodes (the whole IR; everything else is a registry call):

    get       read a site                       site
    set       write a site: args[0]            site
    grad      gradient of args[0] (a tensor a site produced)
    set_grad  replace the gradient of args[0] by args[1]
    module    call the module at args[0] (a path) on args[1:], kwargs
    param     read the parameter or buffer at args[0] (a dotted path)
    backward  args[0].backward(gradient=args[1]) restricted to the declared .grads
    import    in a session: the value of node args[1] of the session's trace args[0]
    <name>    a registry op, e.g. "torch.add", "Tensor.sum", "operator.getitem"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

WIRE_VERSION = "1.0"

GET, SET, GRAD, SET_GRAD, MODULE, PARAM, BACKWARD, IMPORT = (
    "get",
    "set",
    "grad",
    "set_grad",
    "module",
    "param",
    "backward",
    "import",
)
OPCODES = frozenset({GET, SET, GRAD, SET_GRAD, MODULE, PARAM, BACKWARD, IMPORT})
SITE_KINDS = ("input", "inputs", "output", "result")
ALL_STEPS = -1  # Site.step for nodes inside `tracer.all()`

# Graph.mode: what one request runs.
TRACE, GENERATE, SESSION, SCAN = "trace", "generate", "session", "scan"
MODES = (TRACE, GENERATE, SESSION, SCAN)

# Keys of Graph.options (all optional).
FORWARD_KWARGS = "forward"  # keyword arguments of the model's forward (trace, scan)
GENERATE_KWARGS = "generate"  # keyword arguments of `generate` (max_new_tokens, sampling)
SEED = "seed"  # generate: the run's private random seed
VALIDATE = "validate"  # trace: shape-check with fake tensors before the real run
GROUPS = "groups"  # server-built (graph/merge.py): each co-tenant's row group


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to the value of an earlier node."""

    id: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A reference to a tensor attached to the graph (travels as safetensors)."""

    key: str


class Site(NamedTuple):
    """Where a `get`/`set` touches the model (a tuple: it is also the site's lookup key).

    path: dotted module path ("" is the root); kind: input | inputs | output | result;
    call: which call of the module within a step (0-based); step: generation step,
    or ALL_STEPS for every step.
    """

    path: str
    kind: str
    call: int = 0
    step: int = 0

    def __str__(self) -> str:
        """How messages name a site: `layers.0.output`, `attn.call(1).input`, `<root>.output`."""
        call = f".call({self.call})" if self.call else ""
        step = "" if self.step == 0 else " (every step)" if self.step == ALL_STEPS else f" (step {self.step})"
        return f"{path_name(self.path)}{call}.{self.kind}{step}"


def path_name(path: str) -> str:
    """A module path as messages show it ("" is the root)."""
    return path or "<root>"


@dataclass(slots=True)
class Node:
    id: int
    op: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    site: Site | None = None
    invoke: int | None = None  # rows of this invoke; None = the whole batch
    step: int = 0  # the step scope the node runs in (ALL_STEPS: every step)
    save: bool = False
    where: str = ""  # the user's file:line

    def refs(self) -> list[int]:
        """Ids of the nodes this node reads."""
        out: list[int] = []
        _collect_refs(self.args, out)
        _collect_refs(self.kwargs, out)
        return out


def _collect_refs(obj: Any, out: list[int]) -> None:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, Ref):
            out.append(x.id)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, slice):
            stack.extend((x.start, x.stop, x.step))


def renumber(x: Any, offset: int, tensors: Callable[[TensorRef], TensorRef]) -> Any:
    """Graph data `x` moved into another graph: every `Ref` shifted by `offset`, every
    `TensorRef` through `tensors` (containers and slices rebuilt, literals as they are)."""
    t = type(x)
    if t is Ref:
        return Ref(x.id + offset)
    if t is TensorRef:
        return tensors(x)
    if t is tuple or t is list:
        return t(renumber(y, offset, tensors) for y in x)
    if t is dict:
        return {k: renumber(v, offset, tensors) for k, v in x.items()}
    if t is slice:
        return slice(renumber(x.start, offset, tensors), renumber(x.stop, offset, tensors),
                     renumber(x.step, offset, tensors))
    return x


def find(x: Any, kind: type) -> Any:
    """The first object of exactly type `kind` inside nested lists, tuples, dicts (their
    subclasses too: torch.Size, namedtuples, ModelOutputs) and slices; None if none.
    Containers are told by their real type, never by `isinstance`: a proxy may claim to
    be a tuple while recording."""
    stack = [x]
    while stack:
        y = stack.pop()
        t = type(y)
        if t is kind:
            return y
        if t is tuple or t is list or issubclass(t, (list, tuple)):
            stack.extend(y)
        elif issubclass(t, dict):
            stack.extend(y.values())
        elif t is slice:
            stack.extend((y.start, y.stop, y.step))
    return None


@dataclass(slots=True)
class Invoke:
    """One invoke's model inputs (already encoded: tensors as TensorRefs)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Graph:
    """An experiment: nodes, the invokes that feed the forward pass, attached tensors.

    mode: TRACE (one forward), GENERATE (options[GENERATE_KWARGS] holds generate's
    kwargs), SCAN (fake tensors), or SESSION: `children` are traces run in order; a child
    reads an earlier child's value through an `import` node. A session's own nodes and
    invokes are empty. Option keys are named above (FORWARD_KWARGS, ...).
    """

    model: str = ""
    nodes: list[Node] = field(default_factory=list)
    invokes: list[Invoke] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)  # key -> torch.Tensor
    mode: str = TRACE
    options: dict[str, Any] = field(default_factory=dict)
    version: str = WIRE_VERSION
    children: list[Graph] = field(default_factory=list)
    # Not on the wire: the recording tracer's summary of everything a runtime plan depends
    # on (ops, sites, references, saves), so a graph recorded again can reuse its plan.
    plan_key: Any = field(default=None, compare=False, repr=False)
    # Not on the wire either: a co-tenants' graph (graph/merge.py) keeps the graphs it was
    # merged from, so it can be handed on as them (a tensor-parallel group's other ranks
    # merge them again: options[GROUPS] is server-built and never decoded).
    merged_from: list[Graph] | None = field(default=None, compare=False, repr=False)

    def add(self, op: str, args: tuple = (), kwargs: dict | None = None, **fields: Any) -> Node:
        node = Node(len(self.nodes), op, args, kwargs or {}, **fields)
        self.nodes.append(node)
        return node

    def attach(self, tensor: Any) -> TensorRef:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = tensor
        return TensorRef(key)

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        lines = [f"graph {self.model!r} mode={self.mode} invokes={len(self.invokes)}"]
        lines += [format_node(n) for n in self.nodes]
        return "\n".join(lines)


def format_node(n: Node) -> str:
    site = f" @{n.site}" if n.site else ""
    args = ", ".join(_fmt(a) for a in n.args)
    kw = "".join(f", {k}={_fmt(v)}" for k, v in n.kwargs.items())
    flags = (" save" if n.save else "") + (f" invoke={n.invoke}" if n.invoke is not None else "")
    return f"  %{n.id} = {n.op}({args}{kw}){site}{flags}  # {n.where}"


def _fmt(x: Any) -> str:
    if isinstance(x, Ref):
        return f"%{x.id}"
    if isinstance(x, TensorRef):
        return f"<tensor {x.key}>"
    return repr(x)
