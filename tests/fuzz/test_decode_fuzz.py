"""The graph decoder and validator under generated input (`wire.decode`, in-process).

Properties, for every document generated from the JSON Schema and every mutation of a
real recorded graph (tests/fuzz/graph_strategies.py):
- the answer is a Graph or a GraphError (a 4xx on the server) with a message; nothing
  else escapes (no TypeError, KeyError, RecursionError, MemoryError, ...);
- a graph it accepts survives a round trip (`encode` then `decode` gives the same wire
  bytes): what the server stores is what it checked;
- no case takes past the deadline (a hang), and the process's memory does not grow with
  the cases: the Python heap (tracemalloc) after a second batch of cases is within a
  margin of after the first.

CI size: 1,000 schema documents + 2,500 JSON mutations + 1,500 tensor mutations (5,000);
`make fuzz` runs 20 times as many (100,000).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

from graph_strategies import Recorded, cases, mutated_json, mutated_tensors, schema_documents
from hypothesis import HealthCheck, given, settings

from nnglass.errors import GraphError
from nnglass.graph import wire
from nnglass.graph.ir import Graph

SEEN: dict[str, int] = {"accepted": 0, "refused": 0}


def judged(graph_json: bytes, tensors: bytes | None) -> Graph | None:
    """Decode; a refusal must be a GraphError naming the problem. None: refused."""
    try:
        graph = wire.decode(graph_json, tensors)
    except GraphError as e:
        assert e.message and isinstance(e.message, str), repr(e)
        SEEN["refused"] += 1
        return None
    SEEN["accepted"] += 1
    again = wire.encode(graph)
    assert wire.encode(wire.decode(*again)) == again
    return graph


def dumped(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@cases(1000)
@given(schema_documents)
def test_schema_documents(doc: Any) -> None:
    judged(dumped(doc), None)


def test_mutated_recorded_graphs(recorded: Recorded) -> None:
    @cases(2500)
    @given(mutated_json(recorded))
    def run(case: tuple[dict, bytes | None]) -> None:
        judged(dumped(case[0]), case[1])

    before = dict(SEEN)
    run()
    # Both outcomes occur: the mutations reach past the first check, and some stay valid.
    assert SEEN["accepted"] > before["accepted"] and SEEN["refused"] > before["refused"], SEEN


def test_mutated_tensor_attachments(recorded: Recorded) -> None:
    @cases(1500)
    @given(mutated_tensors(recorded))
    def run(case: tuple[dict, bytes | None]) -> None:
        judged(dumped(case[0]), case[1])

    run()


def test_the_recorded_graphs_are_accepted(recorded: Recorded) -> None:
    """The seeds of the mutations are valid graphs (else the mutations test little)."""
    for doc, tensors in recorded:
        assert judged(dumped(doc), tensors) is not None


def test_decoding_holds_no_memory(recorded: Recorded) -> None:
    """The Python heap after 1,000 more decodes of mutated graphs is within 1 MiB of
    after the first 1,000 (a leak of even 1 KiB a case would show as 1 MiB)."""
    batch: list[tuple[dict, bytes | None]] = []

    @settings(max_examples=1000, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_json(recorded))
    def collect(case: tuple[dict, bytes | None]) -> None:
        batch.append(case)

    collect()

    def run() -> int:
        for doc, tensors in batch:
            try:
                wire.decode(dumped(doc), tensors)
            except GraphError:
                pass
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        first = run()
        second = run()
    finally:
        tracemalloc.stop()
    assert second - first < 2**20, (first, second)
