"""The server's side of one worker process (the child is `worker.py`, which also states
the JSON-lines protocol they speak).

Invariants:
- One request (or generation session: `stream`) in flight per handle; an answer comes
  within the timeout, or the child is killed. A timeout or a crash (EOF) is an ERROR
  answer and leaves the handle dead until `restart()`. `run` never raises for a job's
  failure.
- A step line (server/steps.py) of a job in flight goes to `run`'s `on_step`, in the
  thread that called `run`, as it arrives; it is never the answer.
- In a generation session, jobs to run beside the batch go to the child from a feeder
  thread as the replica has them (`beside`), and `stream` returns only once every job it
  sent has its answer, or the child is dead.
- `stop_job(job)` kills the child only while `job` is part of the request in flight, so
  a cancel that arrives late never kills the next job on the same worker.
- Nothing in the server's working directory reaches the child: it runs in a private
  empty directory of its own (removed when it dies), with `-P` where Python has it, so
  no file there can shadow a module (`resource.py`, `torch.py`, ...). Every path the
  child gets is absolute: relative ones (a model source, the job files, PYTHONPATH
  entries, cache and home variables) are resolved against the server's directory first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import NNglassError

__all__ = ["GRACE_SECONDS", "WorkerHandle", "error_answer"]

logger = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # past run_seconds, for encoding and writing the result
_REQUEST_PATHS = ("graph", "tensors", "result")
# Environment variables holding a path the child would otherwise resolve in its own
# (private) directory instead of the server's.
_PATH_VARS = (
    "NNGLASS_HOME",
    "NNGLASS_CACHE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
)


def error_answer(job: Any, kind: str, message: str, where: str = "") -> dict[str, Any]:
    return {"job": job, "status": "ERROR", "error": {"type": kind, "message": message, "where": where}}


class WorkerHandle:
    """The server's side of one worker process. `env` adds to this process's environment;
    the child's stderr is inherited, or appended to `log_path` when given."""

    def __init__(self, model_config: dict[str, Any], env: dict[str, str] | None = None, *,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.config = dict(model_config)
        self.env = dict(env or {})
        self.log_path = log_path
        self.paths: list[str] = []
        self.ready: dict[str, Any] = {}  # the whole ready line (pid; checksum when debugging)
        self._proc: subprocess.Popen[bytes] | None = None
        self._home: str | None = None  # the child's private working directory
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()  # one request in flight
        self._writing = threading.Lock()  # a session's thread and its feeder both write
        self._jobs_lock = threading.Lock()  # guards _jobs and the kill stop_job makes
        self._jobs: frozenset[Any] = frozenset()  # the jobs of the request in flight
        self._dead = True

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 300.0) -> None:
        """Spawn the child and wait until its model is loaded; raise NNglassError if not."""
        self.kill()
        log = open(self.log_path, "ab") if self.log_path is not None else None
        self._home = tempfile.mkdtemp(prefix="nnglass-worker-")
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # the private cwd suffices on 3.10
        command, env = [sys.executable, *safe_path, "-m", "nnglass.server.worker"], _child_env(self.env)
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self._home, env=env
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own copy
        self._proc, self._lines = proc, queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, self._lines), daemon=True,
                         name=f"worker-{self.config.get('name')}-{proc.pid}").start()
        name = self.config.get("name")
        try:
            self._write({**self.config, "source": _absolute_source(self.config.get("source"))})
            msg = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise NNglassError(f"worker for model {name!r} did not load within {timeout:g} s") from None
        except OSError:
            msg = None
        if msg is None or not msg.get("ready"):
            self.kill()
            why = (msg or {}).get("error") or {"type": "crash", "message": f"exit code {proc.returncode}"}
            raise NNglassError(f"worker for model {name!r} failed to start: {why['type']}: {why['message']}")
        self.ready, self.paths, self._dead = msg, list(msg["paths"]), False
        logger.info("worker for model %r ready (pid %s)", name, proc.pid)

    def run(self, request: dict[str, Any], timeout: float | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send one job (or a {"batch": [...]}); return its answer. `timeout` (default
        run_seconds + GRACE_SECONDS) is a hard limit: past it the child is killed.
        `on_step`: each step line of the request's jobs, meanwhile."""
        job = request.get("job")
        with self._lock:
            if not self.alive:
                return error_answer(job, "ExecutionError", "the worker is not running (restart it)")
            seconds = request.get("limits", {}).get("run_seconds")
            if timeout is None and seconds is not None:
                timeout = float(seconds) + GRACE_SECONDS
            deadline = None if timeout is None else time.monotonic() + timeout
            batch = request.get("batch")
            jobs = [r.get("job") for r in batch] if type(batch) is list else [job]
            with self._jobs_lock:
                self._jobs = frozenset(j for j in jobs if j is not None)
            try:
                return self._exchange(_absolute_paths(request), job, timeout, deadline, on_step)
            finally:
                with self._jobs_lock:
                    self._jobs = frozenset()

    def _exchange(
        self, request: dict[str, Any], job: Any, timeout: float | None, deadline: float | None,
        on_step: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        try:
            self._write(request)
        except OSError:
            return self._crashed(job)
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                msg = self._lines.get(timeout=left)
            except queue.Empty:
                self.kill()
                message = f"time limit: the worker was stopped after {timeout:g} s"
                return error_answer(job, "TimeLimitError", message)
            if msg is None:
                return self._crashed(job)
            if "step" in msg:
                if on_step is not None and msg.get("job") in self._jobs:
                    on_step(msg)
                continue
            if msg.get("job") == job:
                return msg
            logger.warning("worker answered for job %r while job %r was running", msg.get("job"), job)

    def stream(self, requests: list[dict[str, Any]], on_step: Callable[[dict[str, Any]], dict[str, Any]],
               timeout: float, on_line: Callable[[dict[str, Any]], None] | None = None,
               beside: Callable[[float], list[dict[str, Any]]] | None = None) -> dict[str, Any] | None:
        """A generation session (server/generation.py): `on_step(message)` gets every step
        message and returns the reply ({"more", "drop"}, and "timeout": how long the next
        step may take); it also gets each {"beside"} message of answers (its reply unused).
        `beside(wait)`: jobs to run beside the batch now, asked from a thread of this
        handle's while the session runs (a child that has no lane is never asked). None
        when the session ended and every job it was given has its answer; else the answer
        that says why it was lost (a crash; no step message, or no answer of a job beside
        the batch, within its timeout: the child is killed). See handle_session.py."""
        from .handle_session import converse

        with self._lock:
            if not self.alive:
                return error_answer(None, "ExecutionError", "the worker is not running (restart it)")
            try:
                return converse(self, requests, on_step, timeout, on_line, beside)
            except OSError:
                return self._crashed(None)
            finally:
                with self._jobs_lock:
                    self._jobs = frozenset()

    def stop_job(self, job: Any) -> bool:
        """Kill the child if `job` is in the request it runs now; True if it was."""
        with self._jobs_lock:
            if job not in self._jobs:
                return False
            self.kill()
            return True

    def restart(self, timeout: float = 300.0) -> None:
        self.start(timeout)

    def kill(self) -> None:
        """Stop the child now (SIGKILL); the handle is dead until start()/restart()."""
        self._dead = True
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        if self._home is not None:  # the child is gone: nothing runs in its directory
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def _write(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        line = json.dumps(message, ensure_ascii=True).encode() + b"\n"
        with self._writing:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()

    def _crashed(self, job: Any) -> dict[str, Any]:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stdout closed but still running: finish it
            code = None
        self.kill()
        code = self._proc.returncode if code is None else code
        return error_answer(job, "ExecutionError", f"the worker crashed (exit code {code})")


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, with relative paths made absolute. An empty
    PYTHONPATH entry means "the working directory", which is what the child must not see."""
    env = {**os.environ, **extra}
    for var in _PATH_VARS:
        if env.get(var) and not os.path.isabs(os.path.expanduser(env[var])):
            env[var] = os.path.abspath(os.path.expanduser(env[var]))
    if "PYTHONPATH" in env:
        entries = [os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(entries)
    return env


def _absolute_source(source: Any) -> Any:
    """A model source that names a directory relative to the server's cwd, made absolute;
    anything else (a built-in name, a hub id, an absolute path) unchanged."""
    if not isinstance(source, str) or not source:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.is_dir() else source


def _absolute_paths(request: dict[str, Any]) -> dict[str, Any]:
    batch = request.get("batch")
    if type(batch) is list:
        return {**request, "batch": [_absolute_paths(r) if type(r) is dict else r for r in batch]}
    fixed = {k: os.path.abspath(v) for k in _REQUEST_PATHS if isinstance(v := request.get(k), str)}
    return {**request, **fixed}


def _read_lines(stream: IO[bytes], into: queue.Queue[dict[str, Any] | None]) -> None:
    """Reader thread: the child's answer lines into a queue; None at EOF."""
    try:
        for raw in stream:
            try:
                msg = json.loads(raw)
            except ValueError:
                logger.warning("worker wrote a line that is not JSON: %r", raw[:200])
                continue
            if type(msg) is dict:
                into.put(msg)
    finally:
        stream.close()
        into.put(None)
