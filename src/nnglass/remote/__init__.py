"""The client of the service: `remote=True` runs a graph on a server."""

from .client import Job as Job
from .client import RemoteBackend as RemoteBackend
from .client import fill_later as fill_later

__all__ = ["Job", "RemoteBackend", "fill_later"]
