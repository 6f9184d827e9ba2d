"""nnglass: read and edit the internals of PyTorch models with ordinary-looking code.

Public names only; everything else lives in private modules.
"""

from ._config import configure as configure
from .errors import (
    ExecutionError as ExecutionError,
    GraphError as GraphError,
    NNglassError as NNglassError,
    OutOfOrderError as OutOfOrderError,
    PolicyError as PolicyError,
    RemoteError as RemoteError,
    TraceError as TraceError,
    VersionError as VersionError,
)
from .graph.ops import register as register
from .models.nnmodel import NNModel as NNModel

__all__ = [
    "ExecutionError",
    "GraphError",
    "NNModel",
    "NNglassError",
    "OutOfOrderError",
    "PolicyError",
    "RemoteError",
    "TraceError",
    "VersionError",
    "configure",
    "register",
]
__version__ = "0.1.0"
