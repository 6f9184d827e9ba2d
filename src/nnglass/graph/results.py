"""Results on the wire: the saved values of a run as one safetensors file.

Tensors are the file's entries; the JSON of the values (node id → value, encoded with
`wire.encode_value`) sits in the header metadata under "nnglass". One file streams from
disk and decodes without pickle. Model outputs keep their class: a transformers
`ModelOutput` subclass is rebuilt by name from `transformers.modeling_outputs` only;
any other name comes back as a plain dict.
"""

from __future__ import annotations

import json
from typing import Any

import safetensors.torch
import torch

from ..errors import GraphError
from .ir import TensorRef
from .wire import decode_value, encode_value

_KEY = "nnglass"


def encode_results(values: dict[int, Any], session: bool = False) -> bytes:
    """Saved values by node id (a session: by trace index, then node id) → bytes."""
    if session:
        values = {k: {str(i): v for i, v in inner.items()} for k, inner in values.items()}
    tensors: dict[str, torch.Tensor] = {}

    def attach(t: torch.Tensor) -> TensorRef:
        key = f"r{len(tensors)}"
        tensors[key] = t.detach().to("cpu").contiguous().clone()
        return TensorRef(key)

    doc = encode_value({str(k): v for k, v in values.items()}, attach=attach, max_depth=64)
    meta = {_KEY: json.dumps(doc), "session": "1" if session else "0"}
    return safetensors.torch.save(tensors, metadata=meta)


def decode_results(data: bytes) -> dict[int, Any]:
    """Inverse of `encode_results`."""
    try:
        tensors = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        doc = json.loads(meta[_KEY])
    except Exception as e:  # a truncated or foreign file
        raise GraphError(f"not an nnglass result: {type(e).__name__}: {e}") from None
    values = decode_value(doc, tensors=tensors, max_depth=64, records=_record)
    if meta.get("session") == "1":
        return {int(k): {int(i): v for i, v in inner.items()} for k, inner in values.items()}
    return {int(k): v for k, v in values.items()}


def _record(name: str, items: dict[str, Any]) -> Any:
    module, _, cls_name = name.rpartition(".")
    if module.startswith("transformers."):
        import transformers.modeling_outputs as outputs
        from transformers.utils import ModelOutput

        cls = getattr(outputs, cls_name, None)
        if isinstance(cls, type) and issubclass(cls, ModelOutput):
            return cls(**items)
    return items
