"""A full result disk: a job whose result does not fit ends ERROR saying so, a submission
that does not fit is a 503 with Retry-After, nothing half-written stays, and the server
goes on serving (the next job that fits completes as if alone). A store that fails
otherwise (anything but a full disk) ends its job ERROR too, and the replica lives on.

The disk is a result store with a byte budget (`FullDisk`, put in place of the server's
own through the stores factory): a write past it raises ENOSPC, as a full disk does. Both
ways a result reaches a store meet it: the worker writing into the store's folder (the
embedded default: its file writes get the same budget) and a store that commits the
worker's result itself (an S3-like store: private copies, then `commit`).
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_kit import big
from live_service import Live, live

from nnglass import LanguageModel
from nnglass.server import stores, worker
from nnglass.server.config import ServerConfig
from nnglass.server.results import GRAPH_FILE, RESULT_FILE, TENSORS_FILE, DirResultStore, LocalFiles
from service_fixtures import PROMPTS, assert_as_alone, post, record, submit, wait_for

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, FULL)


class FullDisk(DirResultStore):
    """A folder store with `free` bytes left. `copies`: the worker gets private copies and
    the store commits its result (as S3ResultStore does), else the store's own files."""

    free = 1 << 62
    copies = False
    broken: Exception | None = None  # a commit raises this (a store failing otherwise than full)

    def _write(self, job_id: str, name: str, data: bytes) -> None:
        if len(data) > self.free:
            raise enospc()
        super()._write(job_id, name, data)
        type(self).free -= len(data)  # the class is the disk: the test sets what is free

    def local_files(self, job_id: str) -> LocalFiles:
        if not self.copies:
            return super().local_files(job_id)
        folder = Path(tempfile.mkdtemp(prefix="full-disk-"))
        graph, tensors = self.load_graph(job_id)
        (folder / GRAPH_FILE).write_bytes(graph)
        if tensors is not None:
            (folder / TENSORS_FILE).write_bytes(tensors)
        result = folder / RESULT_FILE

        def commit() -> None:
            if type(self).broken is not None:
                raise type(self).broken
            if result.is_file():
                self.write_result(job_id, result.read_bytes())

        return LocalFiles(graph=folder / GRAPH_FILE, tensors=folder / TENSORS_FILE if tensors else None,
                          result=result, commit=commit,
                          close=lambda: shutil.rmtree(folder, ignore_errors=True))


class Capped:
    """A file being written on the full disk: what fits lands, then ENOSPC."""

    def __init__(self, file: Any, disk: type[FullDisk]) -> None:
        self.file, self.disk = file, disk

    def write(self, data: bytes) -> int:
        if len(data) > self.disk.free:
            self.file.write(data[: self.disk.free])
            raise enospc()
        self.disk.free -= len(data)
        return self.file.write(data)

    def __enter__(self) -> Capped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@pytest.fixture(scope="module", params=["worker writes", "store commits"])
def site(request: pytest.FixtureRequest, tiny_config: Callable[..., str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    disk = type("Disk", (FullDisk,), {"copies": request.param == "store commits"})

    roots: list[Path] = []

    def open_results(config: ServerConfig) -> FullDisk:
        roots.append(Path(config.home) / "jobs")
        return disk(roots[-1])

    def open_on_disk(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = builtins.open(path, mode, *args, **kwargs)
        on_disk = any(Path(path).is_relative_to(root) for root in roots)  # not a private copy
        return Capped(file, disk) if "w" in mode and on_disk else file

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stores, "open_results", open_results)
        mp.setattr(worker, "open", open_on_disk, raising=False)  # the worker's result writes
        with live(tmp_path_factory.mktemp("full"), tiny_config()) as server:
            server.disk = disk  # type: ignore[attr-defined]
            yield server


@pytest.fixture
def disk(site: Live) -> Iterator[type[FullDisk]]:
    yield site.disk  # type: ignore[attr-defined]
    site.disk.free = 1 << 62  # type: ignore[attr-defined]
    site.disk.broken = None  # type: ignore[attr-defined]


def job_files(site: Live, job: str) -> list[str]:
    folder = Path(site.service.config.home) / "jobs" / job
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_result_that_does_not_fit_ends_error_and_the_next_runs(
    site: Live, disk: type[FullDisk], lm: LanguageModel
) -> None:
    with site.client() as http:
        job = submit(http, big(lm, 4))
        disk.free = 1 << 20  # its graph is stored; its 4 MiB result will not fit
        info = wait_for(http, job)
        assert info["status"] == "ERROR", info
        assert info["error"]["message"] == f"the result could not be stored: {FULL}", info
        assert str(site.service.config.home) not in str(info["error"])  # no server path
        assert http.get(f"/v1/jobs/{job}/result").status_code == 404
        assert RESULT_FILE not in job_files(site, job)
        assert not any(name.startswith(".") for name in job_files(site, job))  # no torn temporary
        graph = record(lm)
        assert_as_alone(http, submit(http, graph), lm, graph)  # what fits still runs


def test_a_submission_that_does_not_fit_is_a_503_and_leaves_nothing(
    site: Live, disk: type[FullDisk], lm: LanguageModel
) -> None:
    jobs = Path(site.service.config.home) / "jobs"
    with site.client() as http:
        before = sorted(p.name for p in jobs.iterdir())
        listed = http.get("/v1/jobs").json()["jobs"]
        disk.free = 0
        r = post(http, record(lm))
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
        assert r.json()["detail"]["type"] == "UnavailableError"
        assert FULL in r.json()["detail"]["message"], r.text
        assert sorted(p.name for p in jobs.iterdir()) == before
        assert http.get("/v1/jobs").json()["jobs"] == listed
        disk.free = 1 << 62  # space again: the same submission is accepted and runs
        graph = record(lm)
        assert_as_alone(http, submit(http, graph), lm, graph)


def test_a_store_failing_otherwise_ends_the_job_error_and_the_replica_lives(
    site: Live, disk: type[FullDisk], lm: LanguageModel
) -> None:
    """Not a full disk: a commit that raises anything else (an S3 error that is not
    "unreachable", a defect) ends the job ERROR with a reason; the replica's loop goes on."""
    if not disk.copies:
        pytest.skip("the worker writes the store's own file: there is no commit to fail")
    with site.client() as http:
        disk.broken = RuntimeError("the store refused the object")
        info = wait_for(http, submit(http, record(lm)))
        assert info["status"] == "ERROR", info
        assert "the server failed while running this job (RuntimeError)" in info["error"]["message"], info
        disk.broken = None
        graph = record(lm, PROMPTS[1])
        assert_as_alone(http, submit(http, graph), lm, graph)
