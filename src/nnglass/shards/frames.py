"""Frames between rank 0 and the other ranks of an embedded group: an 8-byte big-endian
length, a JSON header, then the raw blobs the header lists by length. Never pickle: a
follower reads only JSON and bytes, as a worker does.

Invariant: a frame is written whole and flushed; a short read (the peer is gone) is an
`EOFError`, never a partial frame.
"""

from __future__ import annotations

import json
import struct
from typing import IO, Any

_LENGTH = struct.Struct(">Q")
MAX_HEADER = 1 << 20


def write_frame(out: IO[bytes], header: dict[str, Any], *blobs: bytes) -> None:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, ensure_ascii=True).encode()
    out.write(_LENGTH.pack(len(head)) + head)
    for b in blobs:
        out.write(b)
    out.flush()


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    size = _LENGTH.unpack(_exact(stream, _LENGTH.size))[0]
    if size > MAX_HEADER:
        raise ValueError(f"a frame header of {size} bytes (the most is {MAX_HEADER})")
    header = json.loads(_exact(stream, size))
    blobs = [_exact(stream, int(n)) for n in header.pop("blobs", [])]
    return header, blobs


def _exact(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n) if n else b""
    if len(data) != n:
        raise EOFError("the other rank closed its pipe")
    return data
