"""The client of the service: `remote=True` runs a graph on a server."""

from .client import Job as Job
from .client import RemoteBackend as RemoteBackend

__all__ = ["Job", "RemoteBackend"]
