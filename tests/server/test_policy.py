"""A model's policy refuses exactly what it forbids, before anything runs, at the user's line.

Graphs are recorded with real `NNModel` traces and never run: the models are built with a
`nnglass.Recorder` backend, and `recorded(...)` is a `remote=True` trace on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nnglass
from nnglass.errors import PolicyError
from nnglass.graph.ir import GET, MODULE, Graph, Invoke, Ref, Site
from nnglass.server.config import Limits, Policy, load_config
from nnglass.server.policy import check_policy, match
from nnglass.tracing.tracer import Tracer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "server.toml"


def recorded(net: nnglass.NNModel, *args: object) -> Tracer:
    """A trace block that records and never runs (`net` is built with a `Recorder` backend)."""
    return net.trace(*args, remote=True)


def next_line() -> str:
    """file:line of the line after the caller's."""
    f = sys._getframe(1)
    return f"{f.f_code.co_filename}:{f.f_lineno + 1}"


def paths(module: nn.Module) -> set[str]:
    return {p for p, _ in module.named_modules()}


def refused(graph: Graph, policy: Policy, module: nn.Module) -> PolicyError:
    with pytest.raises(PolicyError) as err:
        check_policy(graph, policy, paths(module))
    return err.value


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 8)


# --- globs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "hit"), [
    ("**", "", True), ("**", "a.b.c", True), ("", "", True), ("*", "", False), ("", "a", False),
    ("a.*", "", False), ("layers.*", "layers.3", True), ("layers.*", "layers", False),
    ("layers.*", "layers.3.mlp", False), ("layers.**", "layers", True), ("layers.**", "layers.3.mlp", True),
    ("**.mlp", "layers.3.mlp", True), ("**.mlp", "mlp", True), ("**.mlp", "layers.3.mlp.fc", False),
    ("*.*.mlp", "layers.3.mlp", True), ("layers.*.mlp", "layers.3.attn", False), ("head", "head", True),
    ("head", "heads", False), ("a.**.b.**.c", "a.x.b.y.z.c", True), ("a.**.b.**.c", "a.b.c", True),
    ("a.**.b.**.c", "a.c", False), ("**.**", "a", True),
])
def test_glob_matches_per_component(pattern: str, path: str, hit: bool) -> None:
    assert match(pattern, path) is hit


def test_glob_with_many_stars_is_fast() -> None:
    assert not match(".".join(["**"] * 30 + ["z"]), ".".join(["a"] * 60))


# --- reading and writing sites ----------------------------------------------------------


def test_default_policy_allows_everything(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[0].output
        h.grad.save()
        net.layers[2].output[:, 0] = 0
        net.head(net.layers[3].output).save()
        net.head.weight.save()
        net.output.sum().backward()
    check_policy(tracer.graph, Policy(), paths(mlp))


def test_read_needs_a_read_match_and_names_the_line(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    policy = Policy(read=["layers.*"], write=[])
    with recorded(net, x) as tracer:
        net.layers[2].output.save()
        args, _ = net.layers[0].inputs
        args[0].save()
        at = next_line()
        net.head.output.save()
    err = refused(tracer.graph, policy, mlp)
    assert err.where == at
    assert "`get` at `head.output`" in err.message
    assert "reading `head.output` is not allowed" in err.message and "readable: 'layers.*'" in err.message
    del tracer.graph.nodes[-1]
    check_policy(tracer.graph, policy, paths(mlp))


def test_write_needs_a_write_match(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        at = next_line()
        net.layers[0].output[:, 0] = 0  # a get, then an in-place setitem on its value
    err = refused(tracer.graph, Policy(write=["head"]), mlp)
    assert err.where == at and "writing `layers.0.output`" in err.message
    assert "writable: 'head'" in err.message
    check_policy(tracer.graph, Policy(write=["layers.0"]), paths(mlp))
    err = refused(tracer.graph, Policy(read=[], write=["**"]), mlp)  # an in-place edit reads first
    assert "reading `layers.0.output`" in err.message


def test_input_and_inputs_need_a_read_match(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    for record in (lambda: net.head.input.save(), lambda: net.head.inputs[0][0].save()):
        with recorded(net, x) as tracer:
            record()
        assert "head.input" in refused(tracer.graph, Policy(read=["layers.*"]), mlp).message
        check_policy(tracer.graph, Policy(read=["head"]), paths(mlp))


@pytest.mark.parametrize(("read", "ok"), [([""], True), (["**"], True), (["*"], False), (["*.**"], False)])
def test_root_is_matched_only_by_empty_or_doublestar(mlp: nn.Module, x: torch.Tensor, read: list[str],
                                                      ok: bool) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        net.output.save()
    if ok:
        check_policy(tracer.graph, Policy(read=read), paths(mlp))
    else:
        assert "reading `<root>.output`" in refused(tracer.graph, Policy(read=read), mlp).message


def test_a_site_on_a_missing_module_is_refused(mlp: nn.Module) -> None:
    graph = Graph(model="MLP")
    graph.add(GET, site=Site("layers.9", "output"), where="exp.py:3")
    err = refused(graph, Policy(), mlp)
    assert "no module at 'layers.9'" in err.message and err.where == "exp.py:3"


def test_the_generated_result_is_always_readable_never_writable(mlp: nn.Module) -> None:
    graph = Graph(model="MLP", mode="generate", options={"generate": {"max_new_tokens": 4}})
    graph.add(GET, site=Site("", "result"), save=True)
    check_policy(graph, Policy(read=[], write=[]), paths(mlp))
    graph.add("set", (None,), site=Site("", "result"))
    assert "cannot be written" in refused(graph, Policy(), mlp).message


# --- gradients, weights, module calls ---------------------------------------------------


def test_gradients_off_refuses_grad_and_backward(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[0].output
        at = next_line()
        g = h.grad.save()
        net.output.sum().backward()
    err = refused(tracer.graph, Policy(gradients=False), mlp)
    assert err.where == at and "`grad`" in err.message and "gradients are off" in err.message
    tracer.graph.nodes.remove(next(n for n in tracer.graph.nodes if n.op == "grad"))
    assert "`backward`" in refused(tracer.graph, Policy(gradients=False), mlp).message
    assert g is not None


def test_set_grad_needs_the_site_writable(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[0].output
        at = next_line()
        h.grad = torch.zeros(2, 16)
        net.output.sum().backward()
    err = refused(tracer.graph, Policy(write=["head"]), mlp)
    assert err.where == at and "`set_grad`" in err.message and "writing `layers.0.output`" in err.message
    check_policy(tracer.graph, Policy(write=["layers.0"]), paths(mlp))


def test_hidden_weights_refuse_parameters(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        at = next_line()
        net.head.weight.save()
    err = refused(tracer.graph, Policy(weights_visible=False), mlp)
    assert err.where == at and "`param`" in err.message and "'head.weight'" in err.message
    assert "hidden" in err.message
    check_policy(tracer.graph, Policy(), paths(mlp))


def test_module_calls_need_calls_on_and_weights_visible(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[3].output
        at = next_line()
        net.head(h).save()
    check_policy(tracer.graph, Policy(), paths(mlp))
    err = refused(tracer.graph, Policy(weights_visible=False, module_calls=True), mlp)
    assert err.where == at and "calling `head`" in err.message and "weights" in err.message
    err = refused(tracer.graph, Policy(module_calls=False), mlp)
    assert err.where == at and "module calls are off" in err.message


def test_calling_a_missing_module_is_refused(mlp: nn.Module) -> None:
    graph = Graph(model="MLP")
    graph.add(MODULE, ("nope",), where="exp.py:7")
    assert "no module at 'nope'" in refused(graph, Policy(), mlp).message


def test_options_and_attributes_that_expose_other_modules(mlp: nn.Module, x: torch.Tensor) -> None:
    partial = Policy(read=["", "layers.*"])
    graph = Graph(model="MLP", options={"forward": {"output_hidden_states": True}})
    assert "output_hidden_states" in refused(graph, partial, mlp).message
    check_policy(graph, Policy(), paths(mlp))
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        out = net.output
        at = next_line()
        out.hidden_states.save()
    err = refused(tracer.graph, partial, mlp)
    assert err.where == at and "hidden_states" in err.message
    check_policy(tracer.graph, Policy(), paths(mlp))
    with pytest.raises(nnglass.TraceError, match="KV cache"), recorded(net, x):
        net.output.past_key_values.save()  # never a value, whatever the policy


# --- limits ------------------------------------------------------------------------------


def lm_graph(*prompt_shapes: tuple[int, int], new: int | None = None) -> Graph:
    options = {} if new is None else {"generate": {"max_new_tokens": new}}
    graph = Graph(model="lm", mode="trace" if new is None else "generate", options=options)
    for shape in prompt_shapes:
        ids, mask = graph.attach(torch.zeros(shape, dtype=torch.long)), graph.attach(torch.ones(shape))
        graph.invokes.append(Invoke((), {"input_ids": ids, "attention_mask": mask}))
    return graph


def test_prompt_tokens_are_summed_over_invokes(mlp: nn.Module) -> None:
    policy = Policy(limits=Limits(prompt_tokens=100))
    check_policy(lm_graph((2, 25), (1, 50)), policy, paths(mlp))
    err = refused(lm_graph((2, 25), (1, 51)), policy, mlp)
    assert "101 tokens" in err.message and "at most 100" in err.message


def test_new_tokens_limit(mlp: nn.Module) -> None:
    policy = Policy(limits=Limits(new_tokens=8))
    check_policy(lm_graph((1, 4), new=8), policy, paths(mlp))
    assert "max_new_tokens=9" in refused(lm_graph((1, 4), new=9), policy, mlp).message
    graph = lm_graph((1, 4), new=8)
    del graph.options["generate"]["max_new_tokens"]
    assert "needs an int max_new_tokens" in refused(graph, policy, mlp).message


def test_graph_node_limit(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[0].output
        for _ in range(9):
            h = h * 2
    assert len(tracer.graph) == 10
    check_policy(tracer.graph, Policy(limits=Limits(graph_nodes=10)), paths(mlp))
    assert "10 nodes" in refused(tracer.graph, Policy(limits=Limits(graph_nodes=9)), mlp).message


# --- sessions ------------------------------------------------------------------------------


def record_session(net: nnglass.NNModel, x: torch.Tensor) -> tuple[Graph, str]:
    session = net.session(remote=True)
    with session:
        with net.trace(x):
            h = net.layers[2].output
        with net.trace(x):
            net.layers[2].output = h
            at = next_line()
            net.head.output.save()
    return Graph(model=net.name, mode="session", children=[t.graph for t in session.tracers]), at


def test_session_children_are_checked(mlp: nn.Module, x: torch.Tensor) -> None:
    graph, at = record_session(nnglass.NNModel(mlp, backend=nnglass.Recorder()), x)
    assert graph.children[1].nodes[0].op == "import"
    check_policy(graph, Policy(read=["layers.*", "head"], write=["layers.*"]), paths(mlp))
    err = refused(graph, Policy(read=["layers.*"]), mlp)
    assert err.where == at and "reading `head.output`" in err.message
    err = refused(graph, Policy(write=[]), mlp)
    assert "writing `layers.2.output`" in err.message


def test_session_nodes_count_across_children(mlp: nn.Module, x: torch.Tensor) -> None:
    graph, _ = record_session(nnglass.NNModel(mlp, backend=nnglass.Recorder()), x)
    total = sum(len(c.nodes) for c in graph.children)
    check_policy(graph, Policy(limits=Limits(graph_nodes=total)), paths(mlp))
    assert f"{total} nodes" in refused(graph, Policy(limits=Limits(graph_nodes=total - 1)), mlp).message


def test_session_prompt_tokens_are_per_trace(mlp: nn.Module) -> None:
    graph = Graph(model="lm", mode="session", children=[lm_graph((1, 60)), lm_graph((1, 60))])
    check_policy(graph, Policy(limits=Limits(prompt_tokens=60)), paths(mlp))
    graph.children.append(lm_graph((1, 61)))
    assert "61 tokens" in refused(graph, Policy(limits=Limits(prompt_tokens=60)), mlp).message


# --- the example provider policy on a Llama ------------------------------------------------


def test_example_provider_policy_exposes_only_the_residual_stream(llama: nn.Module) -> None:
    provider = load_config(EXAMPLE).model("provider-135m")
    assert provider is not None
    policy, ids = provider.policy, torch.zeros(1, 5, dtype=torch.long)
    net = nnglass.NNModel(llama, backend=nnglass.Recorder())
    with recorded(net, ids) as tracer:
        net.model.layers[0].input.save()
        net.model.layers[1].output[:, -1] = 0
        net.output.logits.save()
    check_policy(tracer.graph, policy, paths(llama))
    refusals = {
        "down_proj.input": lambda: net.model.layers[0].mlp.down_proj.input.save(),
        "lm_head.output": lambda: net.lm_head.output.save(),
        "`param`": lambda: net.model.norm.weight.save(),
        "calling `lm_head`": lambda: net.lm_head(net.model.layers[1].output).save(),
        "gradients are off": lambda: (net.model.layers[1].output.grad.save(),
                                      net.output.logits.sum().backward()),
    }
    for expected, record in refusals.items():
        with recorded(net, ids) as tracer:
            record()
        assert expected in refused(tracer.graph, policy, llama).message


# --- in-place edits are writes; weights are never edited -------------------------------


def test_in_place_edits_of_a_site_value_are_writes(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    edits = {
        "Tensor.add_": lambda h: h.add_(1),
        "view then edit": lambda h: h.view(2, 4, 4)[0].zero_(),
        "out=": lambda h: torch.add(h, 1, out=h),
        "inplace=True": lambda h: torch.nn.functional.relu(h, inplace=True),
        "inplace positional": lambda h: torch.nn.functional.relu(h, True),
    }
    for what, edit in edits.items():
        with recorded(net, x) as tracer:
            h = net.layers[0].output
            edit(h)
        err = refused(tracer.graph, Policy(write=[]), mlp)
        at = f"{__file__}:{edit.__code__.co_firstlineno}"  # the lambda's line recorded the edit
        assert err.where == at and "writing `layers.0.output`" in err.message, what
        check_policy(tracer.graph, Policy(write=["layers.0"]), paths(mlp))


def test_in_place_edits_of_fresh_values_are_not_writes(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    with recorded(net, x) as tracer:
        h = net.layers[0].output
        h.clone().add_(1)
        y = h * 2
        y[:, 0] = 0
        torch.add(h, 1, out=y)
        torch.nn.functional.relu(h * 1, inplace=True)
    check_policy(tracer.graph, Policy(write=[]), paths(mlp))


def test_parameters_are_never_edited(mlp: nn.Module, x: torch.Tensor) -> None:
    net = nnglass.NNModel(mlp, backend=nnglass.Recorder())
    for edit in (lambda w: w.mul_(0), lambda w: torch.add(w, 1, out=w), lambda w: w.t().zero_()):
        with recorded(net, x) as tracer:
            w = net.head.weight
            edit(w)
        err = refused(tracer.graph, Policy(), mlp)
        at = f"{__file__}:{edit.__code__.co_firstlineno}"
        assert err.where == at and "parameter 'head.weight'" in err.message and "clone" in err.message


def test_parameter_aliases_through_containers_and_imports(mlp: nn.Module) -> None:
    graph = Graph(model="MLP")
    w = graph.add("param", ("head.weight",))
    box = graph.add("builtins.list", ([Ref(w.id)],))
    item = graph.add("operator.getitem", (Ref(box.id), 0))
    graph.add("Tensor.zero_", (Ref(item.id),), where="exp.py:4")
    err = refused(graph, Policy(), mlp)
    assert err.where == "exp.py:4" and "'head.weight'" in err.message
    first, second = Graph(model="MLP"), Graph(model="MLP")
    first.add("param", ("head.weight",))
    imported = second.add("import", (0, 0))
    second.add("Tensor.fill_", (Ref(imported.id), 0.0), where="exp.py:9")
    session = Graph(model="MLP", mode="session", children=[first, second])
    assert refused(session, Policy(), mlp).where == "exp.py:9"


def test_embedding_max_norm_renorms_its_weight(mlp: nn.Module) -> None:
    graph = Graph(model="MLP")
    w = graph.add("param", ("head.weight",))
    ids = graph.attach(torch.zeros(3, dtype=torch.long))
    graph.add("torch.nn.functional.embedding", (ids, Ref(w.id)), {"max_norm": 1.0})
    assert "'head.weight'" in refused(graph, Policy(), mlp).message
    graph.nodes[-1].kwargs = {}
    check_policy(graph, Policy(), paths(mlp))
