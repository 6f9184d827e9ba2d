"""Jobs beside a generation, in the worker child: the jobs of a generation session that
cannot join its batch (a trace, a session, a backward) run on a thread of their own, the
`Lane`, from the moment they arrive, instead of waiting for the step that runs then to
end; each pass's answers go to the parent the moment it is done.

`Inbox` is the child's one reader of its stdin (for its whole life): a {"beside": [job, ...]}
line goes to the lane at once, whatever the main thread is doing (a batch step); every
other line waits in order for the main thread (`get`).

Invariants:
- A lane pass runs exactly as it would alone or between two steps (`LoadedModel.batch`:
  alone, or in one merged pass, with its own limits); its hooks act only for its own
  thread's run (runtime/hooks.py: the active run is a context variable, and a thread
  starts with none), so neither it nor the batch sees the other's interventions. It runs
  with the model's configured torch threads (a new thread starts with the process's
  count), so its numbers are the lone run's.
- The batch yields to it (`yielding`): while a pass runs, the batch's thread waits at its
  next decoder layer until the pass ends, at most as long as the batch's last forward took
  and once per step (then both run). So a small job starts within one layer, not after a
  whole step, it gets the cores to itself, and a stream of them never stops the batch.
- Passes run one at a time, in the order they came; each job gets exactly one answer,
  {"beside": true, "answers": [...]}, also one the parent has cancelled meanwhile.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import torch

from .fault_hooks import crash_or_hang

if TYPE_CHECKING:
    from .worker import LoadedModel

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], None]
MIN_YIELD_S = 0.05  # the batch waits at least this long for a pass (before its first timed forward too)


class Lane:
    """Runs passes of jobs beside a generation batch, one at a time, on its own thread."""

    def __init__(self, replica: LoadedModel, send: Send) -> None:
        self.replica, self.send = replica, send
        self._passes: queue.Queue[list[dict[str, Any]]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # passes queued or running
        self._jobs: set[Any] = set()  # their jobs
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._serve, daemon=True, name="nnglass-beside").start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def put(self, requests: list[dict[str, Any]]) -> None:
        with self._lock:
            self._waiting += 1
            self._jobs.update(r.get("job") for r in requests)
            self._idle.clear()
        self._passes.put(requests)

    def jobs(self) -> list[Any]:
        """The jobs of the passes queued or running now."""
        with self._lock:
            return list(self._jobs)

    def wait(self, seconds: float) -> None:
        """Until no pass runs or waits, at most `seconds`."""
        self._idle.wait(seconds)

    def _serve(self) -> None:
        while True:
            requests = self._passes.get()
            try:
                self.send({"beside": True, "answers": self._answers(requests), **self.replica.debug_info()})
            except Exception:  # the pipe is gone: the child exits at EOF on stdin
                log.exception("answers of jobs beside the batch could not be sent")
            finally:
                with self._lock:
                    self._waiting -= 1
                    self._jobs.difference_update(r.get("job") for r in requests)
                    if not self._waiting:
                        self._idle.set()

    def _answers(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from .worker import _error

        crash_or_hang(requests)  # tests only: a job named to crash or hang the worker does so here too
        try:
            return self.replica._shared(requests, self.send)
        except Exception as e:  # _shared answers each job's own failure; this is a defect
            log.exception("jobs beside the batch failed")
            return [_error(r.get("job"), e) for r in requests]


@contextmanager
def yielding(lane: Lane | None, model: torch.nn.Module | None,
             last_forward: Callable[[], float]) -> Iterator[Callable[[], None]]:
    """While the block runs, this thread's forwards of `model` wait at a decoder layer for
    the lane's pass (see the module docstring); yields `step`, to call before each step
    (once per step). `last_forward()`: seconds the batch's last forward took."""
    layers = _layers(model) if lane is not None and model is not None else []
    me = threading.get_ident()
    waited = [False]

    def hook(module: torch.nn.Module, args: Any) -> None:
        if lane is not None and lane.busy and not waited[0] and threading.get_ident() == me:
            waited[0] = True
            lane.wait(max(last_forward(), MIN_YIELD_S))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield lambda: waited.__setitem__(0, False)
    finally:
        for h in handles:
            h.remove()


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers: the longest ModuleList in the model (`model.layers`, `transformer.h`)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class Inbox:
    """The child's stdin, read by one thread: "beside" lines to the lane at once, every
    other line (a dict, or the ValueError it raised) in order for `get`; None at EOF."""

    def __init__(self, stream: IO[str], lane: Lane | None) -> None:
        self._lines: queue.Queue[dict[str, Any] | ValueError | None] = queue.Queue()
        self._stream, self._lane = stream, lane
        threading.Thread(target=self._read, daemon=True, name="nnglass-inbox").start()

    def get(self) -> dict[str, Any] | ValueError | None:
        return self._lines.get()

    def _read(self) -> None:
        try:
            while line := self._stream.readline():
                try:
                    message = json.loads(line)
                    if type(message) is not dict:
                        raise ValueError(f"a request is a JSON object, got {type(message).__name__}")
                except ValueError as e:
                    self._lines.put(e)
                    continue
                passes = message.get("beside")
                if type(passes) is list and self._lane is not None:
                    self._lane.put([r for r in passes if type(r) is dict])
                else:
                    self._lines.put(message)
        finally:
            self._lines.put(None)
