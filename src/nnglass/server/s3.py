"""Job files in S3-compatible storage when `[server] results = "s3://bucket/prefix"`.

Invariants:
- The endpoint and credentials come from the usual AWS variables (AWS_ENDPOINT_URL,
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, profiles...), read by
  boto3 itself; nothing here holds a secret. The bucket is created on open if missing.
- Each job is `prefix/<job_id>/` with two objects: `graph` (the graph JSON and its
  tensors in one object, `_pack`: one request to store or load a job, since each
  request costs a round trip) and `result.safetensors`. Every method checks the job id
  first (`check_job_id`): a key is never built from an unchecked string.
- A PUT is atomic in S3: a reader sees the old object, the new one, or none.
- With `small` (the job store's database, stores.py), a job's object of at most
  `SMALL_BYTES` (a packed graph, a result) is kept there instead of in S3, written in the
  transaction open on this thread: a graph in its submission's (the row and its graph
  commit together), a result in the one that marks its job COMPLETED (service.finish:
  the status and its result commit together). So a small job makes no S3 request at all
  on its way; any frontend reads the objects from there. A larger one is an S3 object,
  as before. Reads look in `small` first: an object in both (a large result whose status
  did not commit, rewritten small by the job's rerun) is the newer one there. `delete`
  removes both kinds, and `stored_before` counts a small object as one of the job's
  (with the time the database wrote it), so expiry and the leftovers sweep cover both.
- Results leave only through the API after the key check (`open` streams the object);
  no presigned URL is ever made: a link would be a bearer token that outlives the key.
- Storage that cannot be reached is `UnavailableError` (503); a missing object is
  FileNotFoundError, as for files.
- Each request is a round trip (tens of ms to moto, several to a real object store), so
  this process remembers the objects it wrote last (`Recent`: up to `RECENT_BYTES` in
  all, none over `RECENT_OBJECT`) and answers its own reads of them without one: the
  frontend that took a job reads its graph back, and the frontend that ran it serves its
  result, from memory. Sound because a job's objects never change once written (a rerun
  writes the same job's values again, through a store that then remembers those) and
  are removed only by `delete` (here: forgotten too) or after the job's row says its
  result expired (the service reads the row before the result). Other frontends read
  from storage, as before.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import boto3
import botocore.exceptions
from botocore.config import Config

from ..errors import UnavailableError
from .results import GRAPH_FILE, RESULT_FILE, TENSORS_FILE, LocalFiles, check_job_id, is_job_id

__all__ = ["S3ResultStore"]

GRAPH_OBJECT = "graph"
_MAGIC = b"NNG1"  # then the JSON's length (8 bytes, big-endian), 1 if tensors follow, JSON, tensors


def _pack(json_bytes: bytes, tensor_bytes: bytes | None) -> bytes:
    head = _MAGIC + len(json_bytes).to_bytes(8, "big") + (b"\x01" if tensor_bytes is not None else b"\x00")
    return head + json_bytes + (tensor_bytes or b"")


def _unpack(data: bytes) -> tuple[bytes, bytes | None]:
    if data[:4] != _MAGIC or len(data) < 13:
        raise ValueError("not a stored graph (bad header)")
    n, has_tensors = int.from_bytes(data[4:12], "big"), data[12] == 1
    return data[13 : 13 + n], (data[13 + n :] if has_tensors else None)

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
RECENT_BYTES = 64 * 2**20  # what this process remembers of what it wrote, in all
RECENT_OBJECT = 8 * 2**20  # a larger object is never remembered
SMALL_BYTES = 64 * 2**10  # an object this small goes to `small`, when there is one


class SmallObjects(Protocol):
    """Where small job objects live instead (pg_stores.PgSmallObjects)."""

    def put(self, job_id: str, name: str, data: bytes) -> None: ...
    def get(self, job_id: str, name: str) -> bytes | None: ...
    def delete(self, job_id: str) -> bool: ...
    def written(self) -> dict[str, float]: ...


class Recent:
    """The objects this process wrote last, by key, least recently used out first."""

    def __init__(self, limit: int = RECENT_BYTES, largest: int = RECENT_OBJECT) -> None:
        self.limit, self.largest, self.size = limit, largest, 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._drop(key)
            if len(data) > self.largest:
                return
            self._data[key], self.size = data, self.size + len(data)
            while self.size > self.limit:
                self._drop(next(iter(self._data)))

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def forget(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._data if k.startswith(prefix)]:
                self._drop(key)

    def _drop(self, key: str) -> None:
        data = self._data.pop(key, None)
        if data is not None:
            self.size -= len(data)


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """Unreachable storage is UnavailableError; a missing object FileNotFoundError."""
    try:
        yield
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise FileNotFoundError(code) from None
        if code.startswith("5") or code in {"SlowDown", "ServiceUnavailable", "RequestTimeout"}:
            raise UnavailableError(
                f"result storage is unavailable ({code}); try again in a few seconds"
            ) from None
        raise
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectionClosedError,
        botocore.exceptions.ReadTimeoutError,
        botocore.exceptions.ConnectTimeoutError,
    ) as e:
        raise UnavailableError(
            f"cannot reach result storage ({type(e).__name__}); try again in a few seconds"
        ) from None


class S3ResultStore:
    """Job files under `s3://bucket/prefix`."""

    def __init__(self, url: str, small: SmallObjects | None = None) -> None:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket (s3://bucket/prefix)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.recent, self.small = Recent(), small
        config = Config(connect_timeout=2, read_timeout=30, retries={"max_attempts": 2})
        self.s3 = boto3.client("s3", config=config)
        with _reachable():
            try:
                self.s3.head_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) not in _MISSING:
                    raise
                self.s3.create_bucket(Bucket=bucket)

    def _key(self, job_id: str, name: str = "") -> str:
        folder = f"{self.prefix}/{check_job_id(job_id)}/" if self.prefix else f"{check_job_id(job_id)}/"
        return folder + name

    def _put(self, job_id: str, name: str, data: bytes) -> None:
        key = self._key(job_id, name)
        if self.small is not None and len(data) <= SMALL_BYTES:
            self.small.put(job_id, name, data)
        else:
            with _reachable():
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        self.recent.put(key, data)  # stored: from now on what a read would answer

    def _held(self, job_id: str, name: str) -> bytes | None:
        """The object without a request to S3: remembered, or a row of `small`."""
        data = self.recent.get(self._key(job_id, name))
        if data is None and self.small is not None:
            data = self.small.get(job_id, name)
        return data

    def _get(self, job_id: str, name: str) -> bytes:
        data = self._held(job_id, name)
        if data is not None:
            return data
        with _reachable():
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(job_id, name))["Body"]
            return cast(bytes, body.read())

    def _size(self, job_id: str, name: str) -> int | None:
        data = self._held(job_id, name)
        if data is not None:
            return len(data)
        try:
            with _reachable():
                head = self.s3.head_object(Bucket=self.bucket, Key=self._key(job_id, name))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def save_graph(self, job_id: str, json_bytes: bytes, tensor_bytes: bytes | None = None) -> None:
        self._put(job_id, GRAPH_OBJECT, _pack(json_bytes, tensor_bytes))

    def has_graph(self, job_id: str) -> bool:
        return self._size(job_id, GRAPH_OBJECT) is not None

    def load_graph(self, job_id: str) -> tuple[bytes, bytes | None]:
        return _unpack(self._get(job_id, GRAPH_OBJECT))

    def local_files(self, job_id: str) -> LocalFiles:
        """The graph copied into a private temporary folder; `commit` uploads the result
        the worker wrote there, `close` removes the folder."""
        graph, tensors = self.load_graph(job_id)
        folder = Path(tempfile.mkdtemp(prefix="nnglass-job-"))
        (folder / GRAPH_FILE).write_bytes(graph)
        if tensors is not None:
            (folder / TENSORS_FILE).write_bytes(tensors)
        result = folder / RESULT_FILE

        def commit() -> None:
            if not result.is_file():
                return
            if result.stat().st_size <= RECENT_OBJECT:
                self._put(job_id, RESULT_FILE, result.read_bytes())
                return
            with _reachable(), result.open("rb") as body:  # streamed: never all in memory
                self.s3.put_object(Bucket=self.bucket, Key=self._key(job_id, RESULT_FILE), Body=body)

        return LocalFiles(
            graph=folder / GRAPH_FILE,
            tensors=folder / TENSORS_FILE if tensors is not None else None,
            result=result,
            commit=commit,
            close=lambda: shutil.rmtree(folder, ignore_errors=True),
        )

    def write_result(self, job_id: str, data: bytes) -> None:
        self._put(job_id, RESULT_FILE, data)

    def result_size(self, job_id: str) -> int | None:
        return self._size(job_id, RESULT_FILE)

    def open(self, job_id: str) -> BinaryIO:
        """The result as a stream from storage (FileNotFoundError when there is none)."""
        data = self._held(job_id, RESULT_FILE)
        if data is not None:
            return io.BytesIO(data)
        with _reachable():
            body: Any = self.s3.get_object(Bucket=self.bucket, Key=self._key(job_id, RESULT_FILE))["Body"]
        return cast(BinaryIO, body)

    def delete(self, job_id: str) -> bool:
        folder = self._key(job_id)
        self.recent.forget(folder)
        small = self.small is not None and self.small.delete(job_id)
        with _reachable():
            listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=folder).get("Contents", [])
            if not listed:
                return small
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listed]}
            )
        return True

    def stored_before(self, when: float) -> list[str]:
        """The jobs whose objects were all last written before `when` (epoch seconds, the
        storage's clock; S3 keeps whole seconds)."""
        base = f"{self.prefix}/" if self.prefix else ""
        newest: dict[str, float] = {}
        with _reachable():
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for o in page.get("Contents", []):
                    job, slash, _ = o["Key"][len(base):].partition("/")
                    if slash:
                        newest[job] = max(newest.get(job, 0.0), o["LastModified"].timestamp())
        for job, t in (self.small.written() if self.small is not None else {}).items():
            newest[job] = max(newest.get(job, 0.0), t)  # a small graph counts as one of its objects
        return [job for job, t in newest.items() if t < when and is_job_id(job)]
