"""Notebook views: a model's module tree and a saved value as HTML, checked by parsing
the HTML and comparing it with the module tree (`named_modules`) and the tensor itself.
"""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

from nnglass import NNModel, viz

CANARY = "_ipython_canary_method_should_not_exist_"


class Tree(HTMLParser):
    """Elements carrying `data-path`, with the data-path of the one they sit in, and the
    well-formedness of the tags that nest (details, summary, div, span, svg, ...)."""

    VOID = {"br", "img", "rect", "meta", "input"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.entries: dict[str, dict[str, str]] = {}
        self.parent: dict[str, str | None] = {}
        self.badges: dict[str, set[str]] = {}
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags: {self.stack}"

    def _owner(self) -> str | None:
        return next((p for _, p in reversed(self.stack) if p is not None), None)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "data-path" in a:
            path = a["data-path"]
            assert path not in self.entries, f"{path!r} listed twice"
            self.parent[path] = self._owner()
            self.entries[path] = {**a, "tag": tag}
            self.badges[path] = set()
        elif tag == "span" and "nng-badge" in a.get("class", "") and self._owner() is not None:
            self.badges[self._owner()].add(a["title"])
        if tag not in self.VOID:
            self.stack.append((tag, a.get("data-path")))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parent_path(path: str) -> str | None:
    return None if path == "" else path.rsplit(".", 1)[0] if "." in path else ""


def test_module_tree_lists_every_module_nested_as_in_the_model(llama) -> None:
    text = llama._repr_html_()
    assert text == viz.module_tree(llama).text
    tree = Tree(text)
    modules = dict(llama.module.named_modules(remove_duplicate=False))
    assert set(tree.entries) == set(modules)
    for path, module in modules.items():
        entry = tree.entries[path]
        assert entry["data-class"] == type(module).__name__
        assert int(entry["data-params"]) == sum(p.numel() for p in module.parameters())
        assert entry["tag"] == ("details" if module._modules else "div")
        assert tree.parent[path] == parent_path(path)  # nested where the module sits
    assert "open" in tree.entries[""] and "open" not in tree.entries["model.layers.0"]
    assert "<b>tiny-llama</b>" in text and "LlamaForCausalLM" in text
    assert "32, 16, bias=False" not in text and "in_features=32, out_features=16, bias=False" in text


def test_an_envoy_shows_its_subtree_with_full_paths(llama) -> None:
    envoy = llama.model.layers[1]
    tree = Tree(envoy._repr_html_())
    expected = {f"model.layers.1.{p}" if p else "model.layers.1"
                for p, _ in llama.module.model.layers[1].named_modules()}
    assert set(tree.entries) == expected
    assert tree.parent["model.layers.1.self_attn.q_proj"] == "model.layers.1.self_attn"


def test_jupyter_finds_the_html_reprs(llama) -> None:
    # IPython first asks for a canary attribute; an object that answers anything but an
    # AttributeError (a TraceError, say) gets no rich display at all.
    with llama.trace("Hi"):
        h = llama.model.layers[0].output.save()
    for obj in (llama, llama.model.layers[0], h):
        assert getattr(obj, CANARY, None) is None
        assert callable(obj._repr_html_)


def test_policy_marks_what_it_allows(llama) -> None:
    from nnglass.server.config import Policy

    policy = Policy(read=["", "model.layers.*"], write=["model.layers.1.mlp", "model.layers.1.mlp.**"])
    tree = Tree(viz.module_tree(llama, policy=policy).text)
    readable = {"", "model.layers.0", "model.layers.1"}
    writable = {p for p in tree.entries if p.startswith("model.layers.1.mlp")}
    assert len(writable) == 5  # mlp and its four children
    for path in tree.entries:
        expected = {m for m, on in (("readable", path in readable), ("writable", path in writable)) if on}
        assert tree.badges[path] == expected, path
        dimmed = "nng-closed" in tree.entries[path]["class"]
        assert dimmed == (not expected), path
    # The summary `GET /v1/models` returns marks the same.
    summary = {"name": "tiny", "policy": policy.summary()}
    assert viz.module_tree(llama, policy=summary).text == viz.module_tree(llama, policy=policy).text
    assert "badge" not in viz.module_tree(llama).text.split("</style>")[1]


def test_html_escapes_what_modules_say() -> None:
    class Odd(nn.Module):
        def extra_repr(self) -> str:
            return "<script>alert(1)</script>"

    text = NNModel(nn.Sequential(Odd()), name="<b>net</b>")._repr_html_()
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;b&gt;net" in text
    Tree(text)


def parse_value(text: str) -> tuple[dict[str, str], list[int], list[str]]:
    """(the data-stat cells, the histogram's counts, its tooltips)."""

    class Value(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stats: dict[str, str] = {}
            self.counts: list[int] = []
            self.tips: list[str] = []
            self._stat: str | None = None
            self._tip = False

        def handle_starttag(self, tag: str, attrs: list) -> None:
            a = dict(attrs)
            self._stat = a.get("data-stat")
            if tag == "rect":
                self.counts.append(int(a["data-count"]))
            self._tip = tag == "title"

        def handle_data(self, data: str) -> None:
            if self._stat:
                self.stats[self._stat] = data
                self._stat = None
            if self._tip:
                self.tips.append(data)
                self._tip = False

    p = Value()
    p.feed(text)
    return p.stats, p.counts, p.tips


def test_saved_value_shows_shape_dtype_stats_and_histogram(llama) -> None:
    with llama.trace("Hello"):
        h = llama.model.layers[0].output.save()
    text = h._repr_html_()
    assert text == viz.value_summary(h).text
    stats, counts, tips = parse_value(text)
    t = h.value.double()
    assert stats["shape"] == "[1, 5, 32]" and stats["dtype"] == "float32" and stats["device"] == "cpu"
    for key, ref in [("min", t.min()), ("mean", t.mean()), ("max", t.max()), ("std", t.std(unbiased=False))]:
        assert float(stats[key]) == pytest.approx(float(ref), rel=1e-5), key
    ref, _ = np.histogram(t.flatten().numpy(), bins=24, range=(float(t.min()), float(t.max())))
    assert counts == ref.tolist() and sum(counts) == t.numel()
    assert tips[0].startswith(f"{float(t.min()):.4g} to ") and tips[-1].endswith(f": {counts[-1]}")
    assert "<img" not in text and "http" not in text  # self-contained


def test_value_summary_of_odd_values() -> None:
    x = torch.tensor([1.0, float("nan"), 3.0, float("inf"), -float("inf"), 5.0])
    stats, counts, _ = parse_value(viz.value_summary(x).text)
    assert (stats["min"], stats["mean"], stats["max"]) == ("1", "3", "5")  # finite elements only
    assert stats["not finite"] == "1 NaN, 2 ±inf" and sum(counts) == 3
    ids, _, _ = parse_value(viz.value_summary(torch.tensor([[2, 4, 9]])).text)
    assert ids["dtype"] == "int64" and (ids["min"], ids["mean"], ids["max"]) == ("2", "5", "9")
    const, counts, _ = parse_value(viz.value_summary(torch.full((3,), 7.0)).text)
    assert counts == [3] and const["std"] == "0"
    meta, counts, _ = parse_value(viz.value_summary(torch.empty(2, 3, device="meta")).text)
    assert meta["shape"] == "[2, 3]" and "min" not in meta and counts == []
    steps = viz.value_summary([torch.zeros(2), (torch.ones(1), 3)]).text
    assert "list of 2" in steps and "tuple of 2" in steps and "<code>3</code>" in steps
    assert sum(parse_value(steps)[1]) == 3
