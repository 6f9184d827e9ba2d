"""A policy decides over `.source` operations as over module sites: by glob on their path,
only names the loaded forward makes, never inside a module whose input is a lookup of the
weights while they are hidden. Graphs are recorded, never run (a `Recorder` backend)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnglass
from nnglass.errors import PolicyError
from nnglass.models.source_notes import operation_paths
from nnglass.server.config import Policy
from nnglass.server.policy import check_policy


class Attend(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attend()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


X = torch.randn(1, 3, 4)


@pytest.fixture
def net() -> nnglass.NNModel:
    return nnglass.NNModel(Net(), backend=nnglass.Recorder())


def paths(net: nnglass.NNModel) -> set[str]:
    """What a worker reports: module paths and the operations one forward makes."""
    module = net.module
    return {p for p, _ in module.named_modules()} | set(operation_paths(module, lambda: module(X)))


def recorded(net: nnglass.NNModel, edit: bool = False) -> nnglass.graph.ir.Graph:
    with net.trace(X, remote=True):
        if edit:
            net.attn.source.softmax_0.output[:, 0] = 0
        else:
            net.attn.source.softmax_0.output.save()
    return net._remote.last


def test_operations_are_measured_per_module_and_inclusive(net: nnglass.NNModel) -> None:
    ops = set(operation_paths(net.module, lambda: net.module(X)))
    assert ops == {"attn.source.matmul_0", "attn.source.softmax_0", "attn.source.matmul_1",
                   "source.matmul_0", "source.softmax_0", "source.matmul_1"}


def test_globs_decide_reads_and_writes(net: nnglass.NNModel) -> None:
    check_policy(recorded(net), Policy(read=["attn.source.*"]), paths(net))
    with pytest.raises(PolicyError, match=r"reading `attn.source.softmax_0.output` is not allowed by the "
                                          r"policy .*readable: 'attn', 'head'"):
        check_policy(recorded(net), Policy(read=["attn", "head"]), paths(net))
    edit = recorded(net, edit=True)
    check_policy(edit, Policy(read=["**"], write=["attn.source.softmax_0"]), paths(net))
    with pytest.raises(PolicyError, match=r"writing `attn.source.softmax_0.output` is not allowed .*"
                                          r"writable: 'attn.source.matmul_0'"):
        check_policy(edit, Policy(read=["**"], write=["attn.source.matmul_0"]), paths(net))


def test_names_the_loaded_forward_does_not_make_are_refused(net: nnglass.NNModel) -> None:
    graph = recorded(net)
    graph.nodes[0].site = graph.nodes[0].site._replace(path="attn.source.softmax_1")
    with pytest.raises(PolicyError, match=r"the forward of `attn` .* makes no call 'softmax_1' .*it makes: "
                                          r"matmul_0, matmul_1, softmax_0"):
        check_policy(graph, Policy(), paths(net))
    graph.nodes[0].site = graph.nodes[0].site._replace(path="nothing.source.softmax_0")
    with pytest.raises(PolicyError, match="no module at 'nothing'"):
        check_policy(graph, Policy(), paths(net))


def test_hidden_weights_refuse_inside_a_module_whose_input_is_a_lookup(net: nnglass.NNModel) -> None:
    graph = recorded(net)
    hidden = Policy(weights_visible=False)
    check_policy(graph, hidden, paths(net), frozenset({("head", "input")}))
    with pytest.raises(PolicyError, match="reading inside `attn` would reveal the weights"):
        check_policy(graph, hidden, paths(net), frozenset({("attn", "input")}))
    check_policy(graph, Policy(weights_visible=False, expose_embeddings=True), paths(net),
                 frozenset({("attn", "input")}))


def test_a_remote_client_lists_what_the_workers_compute(tiny_dir: Path, tmp_path: Path) -> None:
    """`GET /v1/models/{name}/meta` carries the model's `attention` setting, so a client with
    no weights lists (and checks names against) the operations the workers make."""
    from nnglass import LanguageModel
    from nnglass.server.model_meta import model_meta
    from nnglass.server.openai_graph import Frontend

    for attention, made, absent in (("eager", "softmax_0", "scaled_dot_product_attention_0"),
                                    ("", "scaled_dot_product_attention_0", "softmax_0")):
        folder = tmp_path / (attention or "default")
        folder.mkdir()
        for name, data in model_meta(Frontend("tiny", str(tiny_dir), attention))["files"].items():
            (folder / name).write_bytes(base64.b64decode(data))
        listing = repr(LanguageModel(str(folder)).model.layers[1].self_attn.source)
        assert made in listing and absent not in listing
