"""nnglass: read and edit the internals of PyTorch models with ordinary-looking code.

Public names only; everything else lives in private modules.
"""

from ._config import configure as configure
from .errors import (
    ExecutionError as ExecutionError,
)
from .errors import (
    GraphError as GraphError,
)
from .errors import (
    NNglassError as NNglassError,
)
from .errors import (
    OutOfOrderError as OutOfOrderError,
)
from .errors import (
    PolicyError as PolicyError,
)
from .errors import (
    RemoteError as RemoteError,
)
from .errors import (
    TimeLimitError as TimeLimitError,
)
from .errors import (
    TraceError as TraceError,
)
from .errors import (
    VersionError as VersionError,
)
from .graph.ops import register as register
from .models.language import LanguageModel as LanguageModel
from .models.nnmodel import NNModel as NNModel
from .runtime.backend import Recorder as Recorder
from .tracing.verbs import save as save

__all__ = [
    "ExecutionError",
    "GraphError",
    "LanguageModel",
    "NNModel",
    "NNglassError",
    "OutOfOrderError",
    "PolicyError",
    "Recorder",
    "RemoteError",
    "TimeLimitError",
    "TraceError",
    "VersionError",
    "configure",
    "register",
    "save",
]
__version__ = "0.1.0"
