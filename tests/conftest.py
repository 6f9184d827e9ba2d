"""Shared fixtures: small deterministic models, plain-PyTorch references, and the two
ways every experiment runs (locally, and after a JSON round trip).

The references (the `plain` fixture) use nothing of nnglass: they are plain forward hooks
(and pre-hooks with kwargs), so a test compares nnglass against what PyTorch itself does.
Helpers reach tests through fixtures, not `from conftest import` (another conftest in a
subfolder would shadow the name).

Every model fixture is watched: after each test the model must hold no hooks and its
parameters (values and `requires_grad`) must be bitwise what they were when built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import nnglass
from components import postgres, s3  # noqa: F401  (tests/components.py: session fixtures, shared)
from saved_values import assert_bitwise_equal, unwrap  # tests/saved_values.py, shared

# --- models ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear/ReLU stack in a Sequential (for `net.layers[0]`, `net.layers[-1]`) plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


class CNN(nn.Module):
    """Conv2d followed by an in-place ReLU: the conv's output tensor is overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.conv(x)))
        return self.fc(h.flatten(1))


class Twice(nn.Module):
    """Calls `block` twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.block(x))
        h = self.block(h)
        return self.out(h)


class KwInner(nn.Module):
    """A forward that takes keyword-only inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, *, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.fc(x) * scale


class KwOnly(nn.Module):
    """Keyword-only at the root (`forward(*, x, scale)`) and at a submodule (`inner`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = KwInner()
        self.out = nn.Linear(5, 2)

    def forward(self, *, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.out(self.inner(x=x, scale=scale * 2))


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


class TupleOut(nn.Module):
    """`split` returns a tuple (two tensors); `fc` consumes their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.split = Split()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(x)
        return self.fc(a * b + a)


def _build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().float().eval()


_WATCHED: list[tuple[nn.Module, dict[str, torch.Tensor], dict[str, bool]]] = []


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not), by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _watch(module: nn.Module) -> nn.Module:
    params = {k: v.detach().clone() for k, v in _tensors(module).items()}
    flags = {k: p.requires_grad for k, p in module.named_parameters()}
    _WATCHED.append((module, params, flags))
    return module


@pytest.fixture
def mlp() -> nn.Module:
    return _watch(_build(MLP))


@pytest.fixture
def cnn() -> nn.Module:
    return _watch(_build(CNN))


@pytest.fixture
def twice() -> nn.Module:
    return _watch(_build(Twice))


@pytest.fixture
def kwonly() -> nn.Module:
    return _watch(_build(KwOnly))


@pytest.fixture
def tuple_out() -> nn.Module:
    return _watch(_build(TupleOut))


@pytest.fixture
def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return _watch(_build(lambda: transformers.GPT2LMHeadModel(config)))


@pytest.fixture
def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    return _watch(_build(lambda: transformers.LlamaForCausalLM(config)))


# --- the model is left as it was ------------------------------------------------------


def hooks_left(module: nn.Module) -> list[str]:
    """`path: kind` for every hook still registered on `module` or a submodule."""
    left = []
    for path, sub in module.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            if getattr(sub, kind):
                left.append(f"{path or '<root>'}: {kind}")
    from torch.nn.modules import module as torch_module

    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks"):
        if getattr(torch_module, kind, None):
            left.append(f"global: {kind}")
    return left


def assert_untouched(module: nn.Module, params: dict[str, torch.Tensor],
                     flags: dict[str, bool]) -> None:
    assert hooks_left(module) == [], "hooks left on the model"
    now = _tensors(module)
    assert set(now) == set(params)
    changed = [k for k, v in params.items() if not torch.equal(now[k].detach(), v)]
    assert changed == [], f"parameters/buffers changed: {changed}"
    assert {k: p.requires_grad for k, p in module.named_parameters()} == flags
    grads = [k for k, p in module.named_parameters() if p.grad is not None]
    assert grads == [], f".grad left on parameters: {grads}"


@pytest.fixture(autouse=True)
def _models_left_as_they_were() -> Iterator[None]:
    _WATCHED.clear()
    yield
    try:
        for module, params, flags in _WATCHED:
            assert_untouched(module, params, flags)
    finally:
        _WATCHED.clear()


# --- local and round trip -------------------------------------------------------------


@pytest.fixture(params=["local", "roundtrip"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_net(mode: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[nn.Module], nnglass.NNModel]:
    """NNModel factory for the current mode (NNGLASS_ROUNDTRIP is read at construction)."""

    def make(module: nn.Module) -> nnglass.NNModel:
        with monkeypatch.context() as m:
            if mode == "roundtrip":
                m.setenv("NNGLASS_ROUNDTRIP", "1")
            else:
                m.delenv("NNGLASS_ROUNDTRIP", raising=False)
            return nnglass.NNModel(module)

    return make


@pytest.fixture
def run(mode: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """`run(module, experiment)`: `experiment(net)` traces and returns its saved proxies.

    Returns the saved values. In "roundtrip" mode the experiment runs twice, plainly and
    through the JSON codec, and the two results must be bitwise equal.
    """

    def build(module: nn.Module, roundtrip: bool) -> nnglass.NNModel:
        with monkeypatch.context() as m:
            if roundtrip:
                m.setenv("NNGLASS_ROUNDTRIP", "1")
            else:
                m.delenv("NNGLASS_ROUNDTRIP", raising=False)
            return nnglass.NNModel(module)

    def run_experiment(module: nn.Module, experiment: Callable[[nnglass.NNModel], Any]) -> Any:
        local = unwrap(experiment(build(module, roundtrip=False)))
        if mode == "local":
            return local
        from nnglass.graph import wire

        encoded: list[object] = []
        real = wire.roundtrip

        def spy(graph: Any) -> Any:
            encoded.append(graph)
            return real(graph)

        with monkeypatch.context() as m:
            m.setattr(wire, "roundtrip", spy)
            remote = unwrap(experiment(build(module, roundtrip=True)))
        assert encoded, "NNGLASS_ROUNDTRIP=1 did not send the graph through the codec"
        assert_bitwise_equal(local, remote, "local vs round trip")
        return remote

    return run_experiment


# --- plain PyTorch references ---------------------------------------------------------


def clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if type(x) in (tuple, list):
        return type(x)(clone_tree(y) for y in x)
    if isinstance(x, dict):
        return type(x)({k: clone_tree(v) for k, v in x.items()})
    return x


@contextmanager
def _handles(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def hook_outputs(model: nn.Module, sub: nn.Module, *args: Any, **kwargs: Any) -> tuple[list, Any]:
    """(what a forward hook on `sub` saw at each call, cloned in the hook; model output)."""
    seen: list[Any] = []
    handle = sub.register_forward_hook(lambda m, a, out: seen.append(clone_tree(out)))
    with _handles(handle):
        out = model(*args, **kwargs)
    return seen, out


@torch.no_grad()
def hook_inputs(model: nn.Module, sub: nn.Module, *args: Any, **kwargs: Any) -> tuple[list, Any]:
    """(the (args, kwargs) a pre-hook on `sub` saw at each call, cloned; model output)."""
    seen: list[Any] = []
    handle = sub.register_forward_pre_hook(
        lambda m, a, kw: seen.append((clone_tree(a), clone_tree(kw))), with_kwargs=True
    )
    with _handles(handle):
        out = model(*args, **kwargs)
    return seen, out


@torch.no_grad()
def edit_output(model: nn.Module, sub: nn.Module, edit: Callable[[Any], Any], *args: Any,
                call: int | None = None, **kwargs: Any) -> Any:
    """Model output when a forward hook on `sub` returns `edit(clone of its output)`
    (only at call number `call` when given)."""
    calls = [0]

    def hook(m: nn.Module, a: tuple, out: Any) -> Any:
        n = calls[0]
        calls[0] += 1
        if call is not None and n != call:
            return None
        return edit(clone_tree(out))

    with _handles(sub.register_forward_hook(hook)):
        return model(*args, **kwargs)


@torch.no_grad()
def edit_inputs(model: nn.Module, sub: nn.Module, edit: Callable[[tuple, dict], tuple],
                *args: Any, **kwargs: Any) -> Any:
    """Model output when a pre-hook on `sub` returns `edit(args, kwargs)` (cloned first)."""

    def hook(m: nn.Module, a: tuple, kw: dict) -> Any:
        return edit(clone_tree(a), clone_tree(kw))

    with _handles(sub.register_forward_pre_hook(hook, with_kwargs=True)):
        return model(*args, **kwargs)


class Plain:
    """Plain PyTorch references and checks (no nnglass), for tests via the `plain` fixture."""

    outputs = staticmethod(hook_outputs)
    inputs = staticmethod(hook_inputs)
    edit_output = staticmethod(edit_output)
    edit_inputs = staticmethod(edit_inputs)
    hooks_left = staticmethod(hooks_left)

    @staticmethod
    def randn(*shape: int, seed: int = 1) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def token_ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 100, (batch, length), generator=gen)


@pytest.fixture
def plain() -> type[Plain]:
    return Plain


# --- a cluster ------------------------------------------------------------------------


def work_unit(nodeid: str) -> str:
    """Which of `make test`'s two pytest-xdist workers' units a test belongs to: every test
    on the Ray cluster in one ("ray": a file named test_ray*.py, or a parameter "cluster" or
    "ray", tests/server/conftest.py's `backend`), so only one cluster (fixed loopback addresses)
    runs at a time; every other test with its file, so its module fixtures start once (the
    files on the OpenAI endpoints' server, tests/server/provider_fixtures.py, in one unit)."""
    path, _, rest = nodeid.partition("::")
    params = rest[rest.index("[") + 1 : -1].split("-") if rest.endswith("]") and "[" in rest else []
    on_ray = path.rpartition("/")[2].startswith("test_ray") or {"cluster", "ray"} & set(params)
    return "ray" if on_ray else _ONE_SERVER.get(path.rpartition("/")[2], path)


_ONE_SERVER = {"test_provider.py": "provider", "test_streaming.py": "provider"}  # one session server


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`, by `work_unit`. (pytest-xdist's own loadgroup reads `xdist_group`
    marks by renaming items through an attribute pytest 9 no longer reads, so marks added
    here would be ignored and the tests spread one by one over both workers.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One real two-node Ray cluster on loopback for the whole session (tests/ray_cluster.py),
    started the first time a test asks for it and stopped at the end."""
    from ray_cluster import RayCluster  # tests/ray_cluster.py, shared

    cluster = RayCluster()
    cluster.start()
    yield cluster
    cluster.stop()
