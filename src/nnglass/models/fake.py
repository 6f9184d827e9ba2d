"""Scanning: run a graph against a fake-tensor copy of the model.

Fake tensors carry shapes, dtypes and devices but no data, so a scan finds shape and
index errors at the user's line in milliseconds, before (and without) loading weights.
The fake model is built once per LanguageModel from its config.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..graph.ir import Graph
from ..runtime.interpreter import Interpreter
from ..runtime.run import execute

if TYPE_CHECKING:
    from .language import LanguageModel



def _fake_model(lm: LanguageModel) -> tuple[FakeTensorMode, torch.nn.Module]:
    cached = lm._fake
    if cached is None:
        from transformers import AutoModelForCausalLM

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = AutoModelForCausalLM.from_config(lm.config, dtype=lm._dtype).eval()
        cached = (mode, model)
        object.__setattr__(lm, "_fake", cached)
    return cached


def scan(lm: LanguageModel, graph: Graph, ids: torch.Tensor, mask: torch.Tensor,
         rows: list[tuple[int, int]], imports: dict | None = None) -> dict[int, Any]:  # fmt: skip
    """Run `graph`'s first step on fake tensors; return its saved (fake) values."""
    mode, model = _fake_model(lm)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs every exception a node raises, which we report

    def forward(interp: Interpreter) -> Any:
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    try:
        with mode:
            scan_graph = Graph(graph.model, graph.nodes, graph.invokes, graph.tensors, "generate"
                               if graph.mode == "generate" else "scan", graph.options)  # fmt: skip
            return execute(scan_graph, model, forward, rows, ids.shape[0], imports=imports, order=lm._order)
    finally:
        quiet.setLevel(level)
