"""The KV cache of a continuous batch's running rows (runtime/decode_batch.py): the model's
cache, each row's attention mask over its columns and each row's last position id.

Invariants:
- Rows are in the batch's row order; rows that join go after the others, the shorter
  cache left-padded with masked columns (a masked column changes no row's attention).
- A column leaves (from the left) only when no row attends to it and it lies outside every
  job's own KV length, so that no position a job can see ever moves.
- Only a plain cache (one `DynamicLayer` a layer: keys and values [rows, heads, length,
  dim]) can be joined, sliced and padded so (`check_cache`).
"""

from __future__ import annotations

from typing import Any

import torch


class KVRows:
    """The running rows' cache, mask and positions (all None while no row runs)."""

    def __init__(self) -> None:
        self.cache: Any = None  # the model's DynamicCache over every running row
        self.mask: torch.Tensor | None = None  # [rows, cache length]
        self.positions: torch.Tensor | None = None  # [rows]: each row's last position id

    def clear(self) -> None:
        self.cache, self.mask, self.positions = None, None, None

    def join(self, cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """New rows after the others (a prompt forward's cache, its mask and last positions)."""
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        assert self.mask is not None and self.positions is not None
        length = max(self.mask.shape[1], mask.shape[1])
        self.pad_left(length - self.mask.shape[1])
        extra = length - mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, _pad_seq(theirs.keys, extra)])
            mine.values = torch.cat([mine.values, _pad_seq(theirs.values, extra)])
        self.mask = torch.cat([self.mask, torch.nn.functional.pad(mask, (extra, 0), value=0)])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: torch.Tensor, owns: list[int]) -> None:
        """Only these rows stay, in this order; `owns`: the KV lengths the kept jobs see
        (no column within one of them goes)."""
        assert self.mask is not None and self.positions is not None
        self.cache.batch_select_indices(rows.to(self.mask.device))
        self.mask, self.positions = self.mask[rows], self.positions[rows]
        unused = int((self.mask.cumsum(1) == 0).sum(1).min())
        unused = min(unused, *(self.mask.shape[1] - own for own in owns))
        if unused > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def pad_left(self, n: int) -> None:
        """`n` masked columns before the others."""
        if n <= 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = _pad_seq(layer.keys, n), _pad_seq(layer.values, n)
        assert self.mask is not None
        self.mask = torch.nn.functional.pad(self.mask, (n, 0), value=0)


def check_cache(cache: Any) -> None:
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise NotImplementedError("this model's KV cache is not a plain one (sliding window, linear "
                                  "attention): its generations cannot share a batch")


def _pad_seq(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, n, 0)) if n > 0 else t
