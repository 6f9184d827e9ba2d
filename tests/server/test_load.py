"""A bounded run of the load generator (benchmarks/load.py; the full 200 x 10 run and its
numbers are in docs/benchmarks.md): 6 clients x 5 jobs of mixed kinds (traces,
generations, sessions, errors, cancels), sharing on, against a fresh embedded server.
Nothing lost, no result for the wrong key or differing from the local run, nothing stuck."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import load  # benchmarks/ is not a package


def test_mixed_load_loses_nothing_and_mixes_nothing_up(tiny_dir: Path, tmp_path: Path) -> None:
    row = load.run(clients=6, jobs=5, share=8, timeout=300, model=tiny_dir, workdir=tmp_path)
    assert (row["lost"], row["wrong"], row["stuck"]) == ([], [], []), row
    assert row["ended"] == 30, row
    kinds = {outcome.split(":")[0] for outcome in row["outcomes"]}
    assert kinds == set(load.KINDS), row["outcomes"]
