"""A rank other than 0 in an embedded group: `python -m nnglass.shards.follower`, a
subprocess of rank 0 (the model's worker), spoken to in frames (frames.py) on its
stdin/stdout.

Protocol:
  rank 0 → follower, once: {"config": {... "rank", "world", "host", "port"}}
  follower → rank 0:      {"ready": true} once loaded, or {"error": {...}} (then it exits)
  per run: rank 0 → {"run": {"limits", "grad", "merged"}} + (graph JSON, tensors or b"") per graph
           follower → {"ok": true} (decoded) or {"error": {...}}
           rank 0 → {"go": bool}; when go, after the run: follower → {"ok": true} or {"error"}
  EOF on stdin, or rank 0 gone: the follower exits.

Invariants:
- Like a worker, fd 1 points at stderr before any model code runs; frames go to a
  private duplicate of the real stdout.
- A failed collective leaves this rank out of step with the others: it reports the error
  and exits (rank 0 then ends the group, and its host restarts it).
- Test hook (tests only): NNGLASS_SHARD_TEST_FAIL=<rank>:<absolute path> makes that rank
  refuse every run while the file exists, before the run starts (a failure on one rank).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import IO, Any

from .frames import read_frame, write_frame

logger = logging.getLogger(__name__)

TEST_FAIL = "NNGLASS_SHARD_TEST_FAIL"


def _watch_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="nnglass-rank-parent-watch").start()


def serve(lm: Any, rank: int, limits: Any, inp: IO[bytes], out: IO[bytes]) -> None:
    """Answer runs until rank 0 closes the pipe."""
    from .lockstep import error_dict, follow_run, read_run

    while True:
        try:
            header, blobs = read_frame(inp)
        except EOFError:
            return
        run = header.get("run") or {}
        graph = None
        try:
            graph = read_run(run, blobs, limits)
            test_hook(rank)
            write_frame(out, {"ok": True})
        except Exception as e:
            write_frame(out, {"error": error_dict(e, rank)})
            graph = None
        if not read_frame(inp)[0].get("go") or graph is None:
            continue
        try:
            follow_run(lm, run, graph)
            write_frame(out, {"ok": True})
        except Exception as e:
            answer = error_dict(e, rank)
            write_frame(out, {"error": answer})
            if answer["broken"]:
                logger.error("rank %d: a collective failed (%s): leaving the group", rank, e)
                os._exit(1)


def test_hook(rank: int) -> None:
    who, _, path = os.environ.get(TEST_FAIL, "").partition(":")
    if who == str(rank) and os.path.isabs(path) and os.path.exists(path):
        raise RuntimeError(f"test failure on rank {rank} only")


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    inp = sys.stdin.buffer
    try:
        header, _ = read_frame(inp)
    except EOFError:
        return 0
    config = header["config"]
    rank, world = int(config["rank"]), int(config["world"])
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s rank[{config.get('name')}:{rank}] %(message)s")
    _watch_parent()
    from ..graph.check import Limits
    from .lockstep import error_dict
    from .rank import load_rank, open_store

    try:
        lm = load_rank(config, rank, world, open_store(config["host"], int(config["port"]), rank, world))
    except Exception as e:
        logger.exception("could not load the model")
        write_frame(out, {"error": error_dict(e, rank)})
        return 1
    write_frame(out, {"ready": True})
    serve(lm, rank, Limits(**config.get("limits", {})), inp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
