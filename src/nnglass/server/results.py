"""Where a job's files live: the submitted graph and, once it ran, its result.

Invariants:
- `DirResultStore` keeps each job in `root/<job_id>/`: `graph.json`, optionally
  `tensors.safetensors`, and `result.safetensors` (server/README.md, "Results on the wire").
- Job ids come from URLs. Every method checks the id against `[A-Za-z0-9_-]{16,64}`
  (ValueError otherwise) and that the resolved directory is a direct child of `root`,
  before it touches the file system: no path outside `root` is ever read, written or
  removed.
- Writes are atomic: a temporary file in the same directory, then `os.replace`. A
  reader sees the whole old file, the whole new one, or none; a crash mid-write leaves
  only a `.tmp-*` file that `delete` removes with the directory. Like the job store,
  files survive the process dying; no fsync per job (only an OS crash could lose the
  newest ones — a ~7 ms cost per job on this kind of disk, see docs/benchmarks.md).
- `stored_before(when)` lists the jobs whose files are all older than `when`: the
  service removes those with no row (a submission killed between its graph and its
  row), never a folder young enough to be a submission still in flight.
- A write that fails (a full disk, a read-only one) raises OSError and leaves nothing
  behind; callers turn it into a 503 (a submission) or the job's ERROR (a result), with
  `why_not_stored(e)`: the reason, never a path of the server's.
- `ResultStore` is the seam an S3-compatible backend implements (s3.py); callers never
  branch on which one they hold. It hands bytes and streams; a worker that reads and
  writes files (the subprocess worker) gets them from `local_files`: this store hands
  its own files (no copy), another copies the graph into a private temporary folder
  and stores the result when the worker's answer is committed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = ["DirResultStore", "LocalFiles", "ResultStore", "check_job_id", "is_job_id", "why_not_stored"]

GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"
RESULT_FILE = "result.safetensors"

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def is_job_id(name: object) -> bool:
    return isinstance(name, str) and _JOB_ID.fullmatch(name) is not None


def check_job_id(job_id: object) -> str:
    """`job_id` if it is a well-formed job id, else ValueError (it may come from a URL)."""
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {str(job_id)[:80]!r} (expected 16-64 of [A-Za-z0-9_-])")
    return job_id


def why_not_stored(e: OSError) -> str:
    """Why a write to a store failed ("No space left on device"), without the server's paths."""
    return os.strerror(e.errno) if e.errno else type(e).__name__


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class LocalFiles:
    """A job's files on this machine, for a worker that reads and writes paths."""

    graph: Path
    tensors: Path | None
    result: Path  # where the worker writes the result (atomically)
    commit: Callable[[], None] = _nothing  # store what the worker wrote at `result`
    close: Callable[[], None] = _nothing  # remove any temporary copies


class ResultStore(Protocol):
    def save_graph(self, job_id: str, json_bytes: bytes, tensor_bytes: bytes | None = None) -> None: ...
    def has_graph(self, job_id: str) -> bool: ...
    def load_graph(self, job_id: str) -> tuple[bytes, bytes | None]: ...
    def local_files(self, job_id: str) -> LocalFiles: ...
    def write_result(self, job_id: str, data: bytes) -> None: ...
    def result_size(self, job_id: str) -> int | None: ...
    def open(self, job_id: str) -> BinaryIO: ...
    def delete(self, job_id: str) -> bool: ...
    def stored_before(self, when: float) -> list[str]: ...


class DirResultStore:
    """Job files under the directory `root` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root.resolve())

    def _dir(self, job_id: str) -> Path:
        # The id pattern rules out separators and "..", so `root/<id>` leaves the root only
        # as a symlink planted there: one lstat refuses it (no realpath walk per call; a
        # job's files are found five times per job).
        d = os.path.join(self._root, check_job_id(job_id))
        if os.path.islink(d):
            raise ValueError(f"job directory for {job_id!r} is a link that may lead outside {self.root}")
        return Path(d)

    def _write(self, job_id: str, name: str, data: bytes) -> None:
        d = self._dir(job_id)
        d.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, d / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def save_graph(self, job_id: str, json_bytes: bytes, tensor_bytes: bytes | None = None) -> None:
        """Store the submitted graph (and its attached tensors, if any)."""
        if tensor_bytes is not None:
            self._write(job_id, TENSORS_FILE, tensor_bytes)
        self._write(job_id, GRAPH_FILE, json_bytes)

    def graph_paths(self, job_id: str) -> tuple[Path, Path | None]:
        """`(graph.json, tensors.safetensors or None when the graph attached no tensors)`."""
        d = self._dir(job_id)
        tensors = d / TENSORS_FILE
        return d / GRAPH_FILE, (tensors if tensors.exists() else None)

    def has_graph(self, job_id: str) -> bool:
        return (self._dir(job_id) / GRAPH_FILE).is_file()

    def load_graph(self, job_id: str) -> tuple[bytes, bytes | None]:
        """The graph's JSON and tensors (None: none attached); FileNotFoundError if none."""
        graph, tensors = self.graph_paths(job_id)
        return graph.read_bytes(), (tensors.read_bytes() if tensors is not None else None)

    def local_files(self, job_id: str) -> LocalFiles:
        """The job's own files: the worker writes the result into place itself."""
        graph, tensors = self.graph_paths(job_id)
        return LocalFiles(graph=graph, tensors=tensors, result=self.result_path(job_id))

    def result_path(self, job_id: str) -> Path:
        """Where the result is (or will be); a worker may write it there itself, atomically."""
        return self._dir(job_id) / RESULT_FILE

    def write_result(self, job_id: str, data: bytes) -> None:
        self._write(job_id, RESULT_FILE, data)

    def result_size(self, job_id: str) -> int | None:
        """Size of the result in bytes, None when there is none."""
        try:
            return self.result_path(job_id).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, job_id: str) -> BinaryIO:
        """The result for streaming (FileNotFoundError when there is none)."""
        return self.result_path(job_id).open("rb")

    def delete(self, job_id: str) -> bool:
        """Remove the job's directory and everything in it; False if there was none."""
        d = self._dir(job_id)
        if not d.is_dir():
            return False
        shutil.rmtree(d)
        return True

    def stored_before(self, when: float) -> list[str]:
        """The jobs whose files were all last written before `when` (epoch seconds, the
        file system's clock), a folder that vanishes meanwhile left out."""
        out = []
        for d in self.root.iterdir():
            if not is_job_id(d.name) or d.is_symlink() or not d.is_dir():
                continue
            try:
                newest = max([d.stat().st_mtime, *(f.lstat().st_mtime for f in d.iterdir())])
            except FileNotFoundError:  # deleted (expired, refused) while we looked
                continue
            if newest < when:
                out.append(d.name)
        return out
