"""The op registry: the reviewed list of operations a graph may name.

Invariant: a graph op resolves to a callable only through an `OpRegistry`. The default
registry is an explicit allowlist, not "all of torch": no I/O, nothing that changes
global state (seeds, thread counts, default dtype), nothing that reaches raw storage
(`as_strided`, `set_`, `untyped_storage`, `resize_`, `data_ptr`), no underscore names.
Random sampling ops are left out on purpose: they consume the process-wide generator.
A server's registry is its own; `register()` adds to this process's default only.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

# torch.<name>
TORCH_FUNCTIONS = """
abs absolute acos acosh add addmm all allclose amax amin any arange argmax argmin argsort
argwhere asin asinh atan atan2 atanh baddbmm bmm broadcast_to bucketize cat ceil chunk clamp
clamp_max clamp_min clip clone cos cosh count_nonzero cross cummax cummin cumprod cumsum deg2rad
diag diag_embed diagonal diff dist div divide dot einsum eq equal erf erfc exp exp2
expm1 eye flatten flip floor floor_divide fmod full full_like gather ge gt hstack index_select
inner isclose isfinite isinf isnan kron kthvalue le lerp linspace log log10 log1p log2 log_softmax
logaddexp logcumsumexp logical_and logical_not logical_or logical_xor logit logsumexp lt
masked_fill masked_select matmul max maximum mean median min minimum mm movedim mul multiply
mv nan_to_num nanmean nansum narrow ne neg negative nonzero norm numel ones ones_like outer
permute pow prod rad2deg reciprocal relu remainder repeat_interleave reshape roll rot90 round
rsqrt scatter scatter_add searchsorted select sigmoid sign sin sinh slice_scatter softmax sort
split sqrt square squeeze stack std std_mean sub subtract sum swapaxes t take take_along_dim tan
tanh tensor tensordot tile topk trace transpose tril triu true_divide trunc unbind unique
unsqueeze var var_mean vstack where zeros zeros_like
"""

# torch.nn.functional.<name>
FUNCTIONAL = """
cosine_similarity cross_entropy dropout elu embedding gelu glu group_norm hardtanh kl_div
layer_norm leaky_relu linear log_softmax logsigmoid mse_loss nll_loss normalize one_hot pad
pairwise_distance relu rms_norm selu sigmoid silu softmax softplus tanh
"""

# Tensor.<name>: methods (in-place ones end with "_"; they mutate only graph-owned
# copies, see runtime.plan).
TENSOR_METHODS = """
abs add addmm all amax amin any argmax argmin argsort bfloat16 bool bmm chunk clamp clamp_max
clamp_min clip clone contiguous cos cpu cummax cumsum detach diag diagonal diff dim div double
eq exp expand expand_as flatten flip float floor gather ge gt half index_select int isnan item
le log log_softmax logsumexp long lt masked_fill matmul max mean median min mm mul nan_to_num
narrow ne neg nonzero norm numel permute pow prod reciprocal relu repeat repeat_interleave
reshape reshape_as roll round rsqrt scatter scatter_add select sigmoid sign sin size softmax
sort split sqrt square squeeze std sub sum t tanh tile to tolist topk transpose tril triu
type_as unbind unflatten unique unsqueeze var view view_as where
add_ clamp_ copy_ div_ fill_ index_fill_ masked_fill_ mul_ neg_ scatter_ sub_ zero_
"""

# Every torch.<name> above that tensors also have as a method is reachable as that method
# (`vec.dot(h)`, `W.mv(h)`): the same function, the receiver first.
METHOD_FORMS = tuple(
    n for n in TORCH_FUNCTIONS.split() if hasattr(torch.Tensor, n) and n not in TENSOR_METHODS.split()
)

# Attribute reads a graph may perform (tensors, sizes, transformers ModelOutputs).
ATTRIBUTES = frozenset(
    """
    shape dtype device ndim T mT H real imag is_floating_point
    logits last_hidden_state hidden_states attentions loss
    """.split()
)

OPERATORS = """
add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift
eq ne lt le gt ge getitem setitem contains
"""

BUILTINS = "abs min max round float int bool len tuple list dict slice range sum"

VIEW_OPS = frozenset(
    """
    operator.getitem builtins.getattr Tensor.view Tensor.view_as Tensor.reshape Tensor.reshape_as
    Tensor.transpose Tensor.permute Tensor.t Tensor.squeeze Tensor.unsqueeze Tensor.expand
    Tensor.expand_as Tensor.narrow Tensor.select Tensor.diagonal Tensor.flatten Tensor.unflatten
    Tensor.contiguous Tensor.detach Tensor.to Tensor.float Tensor.chunk Tensor.split Tensor.unbind
    torch.reshape torch.transpose torch.permute torch.t torch.squeeze torch.unsqueeze
    torch.narrow torch.select torch.diagonal torch.flatten torch.chunk torch.split torch.unbind
    torch.swapaxes torch.movedim torch.broadcast_to Tensor.swapaxes Tensor.movedim Tensor.broadcast_to
    """.split()
)


def _getattr(obj: Any, name: str) -> Any:
    if name not in ATTRIBUTES:
        raise AttributeError(f"reading attribute {name!r} is not allowed in a graph")
    return getattr(obj, name)


def _setitem(obj: Any, key: Any, value: Any) -> Any:
    obj[key] = value
    return obj


def is_inplace(name: str) -> bool:
    return name == "operator.setitem" or name.endswith("_")


class OpRegistry:
    """Name → callable. `name in registry`, `registry[name]`, `registry.name_of(fn)`."""

    def __init__(self, ops: dict[str, Callable[..., Any]] | None = None) -> None:
        self._ops: dict[str, Callable[..., Any]] = dict(ops or {})
        self._names: dict[int, str] = {id(f): n for n, f in self._ops.items()}

    def add(self, name: str, fn: Callable[..., Any]) -> None:
        if not name or any(p.startswith("_") for p in name.split(".")):
            raise ValueError(f"op name {name!r} must be dotted and have no underscore parts")
        self._ops[name] = fn
        self._names.setdefault(id(fn), name)

    def alias(self, fn: Callable[..., Any], name: str) -> None:
        """Let `fn` (e.g. `Tensor.__add__`) be recorded as the existing op `name`."""
        self._names.setdefault(id(fn), name)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self._ops[name]

    def get(self, name: str) -> Callable[..., Any] | None:
        return self._ops.get(name)

    def name_of(self, fn: Callable[..., Any]) -> str | None:
        return self._names.get(id(fn))

    def names(self) -> Iterable[str]:
        return self._ops.keys()

    def copy(self) -> OpRegistry:
        new = OpRegistry(self._ops)
        new._names = dict(self._names)
        return new


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _no_hidden_writes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Functional ops that can write into an argument (inplace=True, embedding's max_norm
    renormalizing the weight) are allowed only without that option: in-place edits in a
    graph must be explicit `Tensor.*_` methods, which the runtime tracks."""
    signature = inspect.signature(fn)
    dangerous = {"inplace", "max_norm"} & set(signature.parameters)
    if not dangerous:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name in dangerous:
            if bound.arguments.get(name):
                raise ValueError(f"{fn.__name__}({name}=...) writes into its argument; not allowed in "
                                 "graphs (use an explicit in-place method such as x.relu_())")
        return fn(*args, **kwargs)

    call.__name__ = fn.__name__
    return call


def default_registry() -> OpRegistry:
    reg = OpRegistry()
    for name in TORCH_FUNCTIONS.split():
        reg.add(f"torch.{name}", getattr(torch, name))
    for name in FUNCTIONAL.split():
        fn = getattr(F, name)
        reg.add(f"torch.nn.functional.{name}", _no_hidden_writes(fn) if inspect.isfunction(fn) else fn)
        reg.alias(fn, f"torch.nn.functional.{name}")
    for name in TENSOR_METHODS.split():
        # Unbound method calls dispatch on the receiver, so a `Tensor.size` node also
        # works on a `torch.Size`-free value like a tuple only where torch allows it.
        reg.add(f"Tensor.{name}", _method(name))
        reg.alias(getattr(torch.Tensor, name), f"Tensor.{name}")
    for name in METHOD_FORMS:
        reg.add(f"Tensor.{name}", _method(name))
        reg.alias(getattr(torch.Tensor, name), f"Tensor.{name}")
    for name in OPERATORS.split():
        reg.add(f"operator.{name}", getattr(operator, name))
    reg.add("operator.setitem", _setitem)
    for name in BUILTINS.split():
        reg.add(f"builtins.{name}", getattr(builtins, name))
    reg.add("builtins.getattr", _getattr)
    # Tensor dunders reach __torch_function__ when a real tensor meets a proxy.
    for dunder, op in [
        ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "truediv"),
        ("floordiv", "floordiv"), ("mod", "mod"), ("pow", "pow"), ("matmul", "matmul"),
        ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
        ("and", "and_"), ("or", "or_"), ("xor", "xor"), ("neg", "neg"), ("getitem", "getitem"),
    ]:
        reg.alias(getattr(torch.Tensor, f"__{dunder}__"), f"operator.{op}")
    return reg


REGISTRY = default_registry()


def register(fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """Allow `fn` in graphs built and run by this process (usable as a decorator).

    A server never runs it: its registry holds only what its admin registered. The
    default name is `module.qualname` (`module.name` where the qualname has private
    parts, as torch's builtins do); a script's or notebook's functions (module
    `__main__`) are named `main.qualname`.
    """
    if name is None:
        module = "main" if fn.__module__ == "__main__" else fn.__module__
        qualname = fn.__qualname__
        if any(p.startswith("_") or "<" in p for p in qualname.split(".")):
            qualname = fn.__name__
        name = f"{module}.{qualname}"
    REGISTRY.add(name, fn)
    return fn
