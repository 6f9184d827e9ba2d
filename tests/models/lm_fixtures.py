"""Plain helpers for the LanguageModel tests: a char-level tokenizer, tiny random causal
LMs, and references that use nothing of nnglass (the tokenizer, a plain forward, forward
hooks and pre-hooks, `model.generate`), so every test compares nnglass with what PyTorch
and transformers do on their own.

Imported by `conftest.py` beside it and by the test modules (pytest puts this folder on
`sys.path`, as for every test folder without `__init__.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saved_values import assert_bitwise_equal as assert_bitwise_equal  # shared: tests/saved_values.py
from saved_values import unwrap as unwrap

PAD, EOS, UNK = 0, 1, 2
SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII: 95 chars, ids 3..97
VOCAB = 100


# --- tokenizer and tiny models --------------------------------------------------------


def char_tokenizer() -> Any:
    """A char-level fast tokenizer (one token per character), built without the hub."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2 with learned absolute positions: a wrong position id shows in its numbers."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).float().eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    """Llama with rotary positions and grouped-query attention."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float().eval()


# --- inputs ---------------------------------------------------------------------------


def padded(tokenizer: Any, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `prompts`, left-padded by the tokenizer itself."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the mask: a prompt's first real token is position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(ids: torch.Tensor, width: int, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` ids left-padded to `[B, width]`, with their mask."""
    ids = ids if ids.dim() == 2 else ids[None]
    n = width - ids.shape[1]
    mask = torch.ones_like(ids)
    return (torch.nn.functional.pad(ids, (n, 0), value=pad),
            torch.nn.functional.pad(mask, (n, 0), value=0))


# --- plain references -----------------------------------------------------------------


def clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if type(x) in (tuple, list):
        return type(x)(clone_tree(y) for y in x)
    if type(x) is dict:
        return {k: clone_tree(v) for k, v in x.items()}
    return x


@contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a plain forward (positions follow the mask, no KV cache)."""
    mask = torch.ones_like(ids) if mask is None else mask
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits


@torch.no_grad()
def hook_view(model: nn.Module, sub: nn.Module, ids: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[Any, torch.Tensor]:
    """(what a forward hook on `sub` saw at its first call, cloned; logits)."""
    seen: list[Any] = []
    with hooks(sub.register_forward_hook(lambda m, a, out: seen.append(clone_tree(out)))):
        logits = forward(model, ids, mask)
    return seen[0], logits


def output_editor(edit: Callable[[Any], Any]) -> Callable[..., Any]:
    """A forward hook that returns `edit(clone of the output)`."""
    return lambda m, a, out: edit(clone_tree(out))


def input_editor(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A forward pre-hook that replaces the first positional input by `edit(clone of it)`."""
    return lambda m, args: (edit(args[0].detach().clone()), *args[1:])


@torch.no_grad()
def edited_forward(model: nn.Module, sub: nn.Module, edit: Callable[[Any], Any], ids: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits when a forward hook on `sub` returns `edit(clone of its output)`."""
    with hooks(sub.register_forward_hook(output_editor(edit))):
        return forward(model, ids, mask)


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    hook: tuple[nn.Module, Callable[..., Any]] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`model.generate` greedy output (left-padded prompt + new tokens), optionally with a
    plain forward hook `(module, hook_fn)` installed for the whole generation."""
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", PAD)
    handles = [hook[0].register_forward_hook(hook[1])] if hook else []
    with hooks(*handles):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)


# --- the model is left as it was --------------------------------------------------------


def hooks_left(module: nn.Module) -> list[str]:
    left = []
    for path, sub in module.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(sub, kind):
                left.append(f"{path or '<root>'}: {kind}")
    return left


def fingerprint(module: nn.Module) -> dict[str, Any]:
    """Cheap evidence a model was left as it was: hooks, `.grad`s, flags, a parameter sum."""
    params = list(module.named_parameters())
    with torch.no_grad():
        total = sum(float(p.detach().sum(dtype=torch.float64)) for _, p in params)
    return {
        "hooks": hooks_left(module),
        "grads": [n for n, p in params if p.grad is not None],
        "requires_grad": {n: p.requires_grad for n, p in params},
        "sum": total,
        "training": module.training,
    }


# --- comparing saved values: unwrap, assert_bitwise_equal (tests/saved_values.py) ------


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max |diff| {(a - b).abs().max():.3g}"


@dataclass
class Pair:
    """Two LanguageModels over the same weights: `local`, and `roundtrip` (its graphs go
    through the JSON codec before they run)."""

    local: Any
    roundtrip: Any


def make_lm(build: Callable[[], Any], roundtrip: bool) -> Any:
    """Call `build()` (which constructs a LanguageModel) with NNGLASS_ROUNDTRIP set or not:
    the backend reads it when the model is constructed."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        if roundtrip:
            mp.setenv("NNGLASS_ROUNDTRIP", "1")
        else:
            mp.delenv("NNGLASS_ROUNDTRIP", raising=False)
        return build()
