"""Record-time metadata comes from a meta-device forward (models/metaforward.py): every
site's type, shape, dtype and device must be what the real run gives, checked against
plain forward hooks on the real model — including the masks a decoder layer receives
(`None` where the real run skips the mask), with and without padding.
"""

from __future__ import annotations

from typing import Any

import lm_fixtures as lmf
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from nnglass.graph.ir import Site
from nnglass.models.metaforward import MetaCopy, NotMeta, to_fake
from nnglass.runtime.values import Opaque, graph_view, without_state
from nnglass.tracing.meta import Unknown


def describe(x: Any) -> Any:
    """What metadata may know of a value: its structure, and each tensor's shape, dtype, device."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (Opaque, Unknown)):
        return "state"
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *(describe(y) for y in x))
    if isinstance(x, dict):
        return (type(x).__name__, *sorted((k, describe(v)) for k, v in x.items()))
    return x


def real_sites(model: nn.Module, run: Any) -> dict[tuple[str, str], Any]:
    """Every module's first (args, kwargs) and output in a real forward, by plain hooks."""
    seen: dict[tuple[str, str], Any] = {}

    def pre(path: str) -> Any:
        return lambda m, args, kwargs: seen.setdefault((path, "inputs"), (args, kwargs))

    def post(path: str) -> Any:
        return lambda m, args, out: seen.setdefault((path, "output"), out)

    handles = []
    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(m.register_forward_hook(post(path)))
    with lmf.hooks(*handles), torch.no_grad():
        run()
    return seen


def check_world(lm: Any, model: nn.Module, prompts: str | list[str]) -> None:
    ids, mask = lmf.padded(lm.tokenizer, prompts)
    positions = lmf.positions(mask)
    real = real_sites(
        model, lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    )
    with lm.trace(prompts) as tracer:
        world = tracer.metadata().world()
        lm.output.save()
    assert isinstance(lm._meta, MetaCopy), "the meta forward did not run"
    for (path, kind), value in real.items():
        got = world.site(Site(path, kind, 0, 0), None, later=False)
        want = graph_view(without_state(value) if not path and kind == "output" else value)
        assert describe(got) == describe(want), f"{path or '<root>'} {kind}"


@pytest.mark.parametrize("prompts", ["The truth is", ["a b", "The truth is the"]])
def test_every_site_is_described_as_the_real_run_gives_it(tiny: Any, pair: Any, prompts: Any) -> None:
    check_world(pair.local, tiny.hf, prompts)


def test_smollm2_every_site_as_the_real_run(nnglass_cache: Any) -> None:
    from nnglass import LanguageModel

    lm = LanguageModel("smollm2-135m")
    check_world(lm, lm.module, ["Paris is", "The capital of France is"])


class Widening(nn.Module):
    """Blocks with equal parameters whose outputs differ by a setting: no repeat may be assumed."""

    def __init__(self, repeat: int) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.repeat = repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).repeat(1, self.repeat)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Widening(1), Widening(1), Widening(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x[:, :4])
        return self.head(x)


def test_repeats_only_where_structure_and_inputs_agree() -> None:
    net = Stack()
    x = torch.randn(5, 4)
    real = real_sites(net, lambda: net(x))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = MetaCopy(net)
    sites = copy.capture(lambda m, meta: m(meta(x)))
    as_fake = to_fake(FakeTensorMode(), torch.device("cpu"))
    for (path, kind), value in real.items():
        assert describe(as_fake(sites[(path, kind, 0)])) == describe(value), f"{path} {kind}"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h if h.sum() > 0 else -h


def test_a_branch_on_computed_data_is_refused_not_guessed() -> None:
    copy = MetaCopy(DataDependent())
    with pytest.raises(NotMeta):
        copy.capture(lambda m, meta: m(meta(torch.randn(2, 4))))


def test_a_branch_on_input_data_follows_the_real_values() -> None:
    class OnInput(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Any:
            return x[:, :2] if bool(mask.all()) else (x, mask)

    for mask, kind in ((torch.ones(2, 3, dtype=torch.bool), "tensor"), (torch.eye(2, 3).bool(), "tuple")):
        sites = MetaCopy(OnInput()).capture(lambda m, meta, mask=mask: m(meta(torch.randn(2, 3)), meta(mask)))
        assert describe(sites[("", "output", 0)])[0] == kind


def test_remote_metadata_needs_no_weights(nnglass_cache: Any) -> None:
    """`remote=True`: shapes and types come from the config's meta copy; the client never
    loads the weights, the "server" (a second model, after a JSON round trip) runs the graph."""
    from nnglass import LanguageModel
    from nnglass.runtime.backend import LocalBackend

    server = LanguageModel("smollm2-135m")
    client = LanguageModel("smollm2-135m", backend=LocalBackend(server, roundtrip=True))
    prompt = "The capital of France is"
    with client.trace(prompt, remote=True):
        out = client.model.layers[3].output
        h = out[0] if isinstance(out, tuple) else out
        assert isinstance(h, torch.Tensor) and h.shape[-1] == 576 and h.device.type == "cpu"
        mask = client.model.layers[3].inputs[1]["attention_mask"]
        masked = isinstance(mask, torch.Tensor)
        h = h.save()
    assert client._loaded is None and isinstance(client._meta, MetaCopy)
    ids, attn = lmf.padded(server.tokenizer, prompt)
    layer = server.module.model.layers[3]
    seen: list[Any] = []
    keep = lambda m, a, k: seen.append(k.get("attention_mask"))
    with lmf.hooks(layer.register_forward_pre_hook(keep, with_kwargs=True)):
        lmf.forward(server.module, ids, attn)
    assert masked == isinstance(seen[0], torch.Tensor)  # the real run's mask decision
    assert torch.equal(h, lmf.hook_view(server.module, layer, ids, attn)[0])


def test_a_call_whose_shape_follows_input_data_is_never_repeated() -> None:
    class Keep(nn.Module):
        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            return x[:, : int(n)]

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Keep(), Keep()

        def forward(self, x: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> tuple:
            return self.a(x, n), self.b(x, m)

    x, n, m = torch.randn(2, 6), torch.tensor(2), torch.tensor(5)
    sites = MetaCopy(Two()).capture(lambda model, meta: model(meta(x), meta(n), meta(m)))
    assert [tuple(t.shape) for t in sites[("", "output", 0)]] == [(2, 2), (2, 5)]
