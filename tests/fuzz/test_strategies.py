"""The fuzzers' own strategies keep each case its own (tests/fuzz/graph_strategies.py).

Found by the first long run (`make fuzz`, 2026-12-01): `replacements` handed every draw
the same `{}` (`st.just({})`) and the mutations changed it in place, so one case's
change reached the next cases (a case no longer replayed the same: hypothesis failed the
property as flaky), and once a document held that dict inside itself, `_paths` walked
it forever, until the kernel killed the process at 22 GB (under a memory cap: a
MemoryError, hypothesis seed 2). A defect of the test's generator, not of the decoder:
JSON cannot make a cycle, and nothing the decoder got was ever wrong. The fix is at the
mechanism: `mutate` copies every value it puts in.
"""

from __future__ import annotations

import json
from typing import Any

from graph_strategies import Recorded, _paths, cases, mutate, mutated_json
from hypothesis import given


def containers(doc: Any) -> dict[int, Any]:
    """Every dict and list in `doc` by id (a cycle is walked once, never forever)."""
    found: dict[int, Any] = {}
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, (dict, list)) and id(x) not in found:
            found[id(x)] = x
            stack.extend(x.values() if isinstance(x, dict) else x)
    return found


def test_the_found_case_a_value_put_in_twice(recorded: Recorded) -> None:
    """The run's case: the root replaced by the dict a strategy hands out, then that same
    dict added under "$": the document contained itself."""
    handed_out: dict[str, Any] = {}  # what `st.just({})` gave every draw
    doc = mutate(json.loads(json.dumps(recorded[0][0])), "replace", (), handed_out)
    doc = mutate(doc, "add", value=handed_out, key="$")
    assert handed_out == {}  # the strategy's object is untouched
    assert doc == {"$": {}} and len(_paths(doc)) == 2
    json.dumps(doc)  # no cycle


def test_mutated_cases_share_no_objects(recorded: Recorded) -> None:
    """No dict or list is in two cases, or in a recorded seed graph: a change made in place
    stays in its own case. Kept alive until the end, so no id is reused."""
    seen: list[tuple[dict, bytes | None]] = []

    @cases(200)
    @given(mutated_json(recorded))
    def collect(case: tuple[dict, bytes | None]) -> None:
        json.dumps(case[0])  # a cycle raises here
        seen.append(case)

    collect()
    owner = {i: -1 for doc, _ in recorded for i in containers(doc)}
    for n, (doc, _) in enumerate(seen):
        for i in containers(doc):
            assert owner.setdefault(i, n) == n, f"case {n} shares an object with {owner[i]}"
