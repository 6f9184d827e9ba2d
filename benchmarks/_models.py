"""Deterministic builders for the models and inputs the overhead benchmark runs.

Two models, chosen to separate a framework's fixed per-trace cost from its per-site cost:

- ``mlp``: ``MLP12``, twelve ``Linear(64, 64) + ReLU`` blocks on a batch of 8 x 64. Its forward
  pass takes tens of microseconds, so any tracing overhead dominates it.
- ``gpt2``: a randomly initialised GPT-2-shaped causal LM (8 layers, width 512, 8 heads, GPT-2
  vocabulary; ~51M parameters) on 1 x 64 token ids: a realistic forward pass where overhead is a
  small fraction of the work.

Both are built under ``torch.manual_seed`` so every process (each framework runs in its own, and
nnsight in its own virtual environment) sees bitwise-identical weights and inputs. This file must
import only torch and transformers: both benchmark venvs import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SEED = 0
MLP_LAYERS = 12
MLP_WIDTH = 64
MLP_BATCH = 8
GPT2_LAYERS = 8
GPT2_TOKENS = 64


class MLP12(nn.Module):
    """Twelve ``Linear + ReLU`` blocks; each block is a submodule, so its output is hookable."""

    def __init__(self, width: int = MLP_WIDTH, depth: int = MLP_LAYERS) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass
class Bench:
    """A model plus the fixed call that every framework makes on it."""

    name: str
    module: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    layer_path: str = "layers"  # dotted path to the ModuleList of blocks
    n_layers: int = 0

    def layers(self) -> nn.ModuleList:
        """The block list of the plain torch module."""
        obj: Any = self.module
        for part in self.layer_path.split("."):
            obj = getattr(obj, part)
        return obj

    def forward(self) -> Any:
        """One plain forward pass, exactly as the traces call it."""
        return self.module(*self.args, **self.kwargs)

    @property
    def save1_layer(self) -> int:
        """The block whose output ``save1`` saves: the middle one."""
        return self.n_layers // 2

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build_mlp() -> Bench:
    torch.manual_seed(SEED)
    module = MLP12().eval()
    x = torch.randn(MLP_BATCH, MLP_WIDTH)
    return Bench("mlp", module, args=(x,), layer_path="layers", n_layers=MLP_LAYERS)


def build_gpt2() -> Bench:
    import transformers

    torch.manual_seed(SEED)
    config = transformers.GPT2Config(
        n_layer=GPT2_LAYERS,
        n_embd=512,
        n_head=8,
        vocab_size=50257,
        n_positions=1024,
        attn_implementation="sdpa",
    )
    module = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, GPT2_TOKENS))
    return Bench(
        "gpt2",
        module,
        kwargs={"input_ids": ids, "use_cache": False},
        layer_path="transformer.h",
        n_layers=GPT2_LAYERS,
    )


BUILDERS = {"mlp": build_mlp, "gpt2": build_gpt2}


def build(name: str) -> Bench:
    return BUILDERS[name]()


if __name__ == "__main__":
    for key in BUILDERS:
        bench = build(key)
        print(f"{key}: {bench.n_params:,} parameters")
