"""One exception hierarchy. Every message names the problem, the user's file:line when
there is one, and what to do instead. The server maps each class to one HTTP status
(server/app.py keeps that table)."""

from __future__ import annotations


class NNglassError(Exception):
    """Base class of every error nnglass raises on purpose."""

    def __init__(self, message: str, where: str = "") -> None:
        self.where = where
        super().__init__(f"{message}\n  at {where}" if where else message)
        self.message = message


class TraceError(NNglassError):
    """Code inside a `trace` block cannot be recorded (e.g. `if proxy:`)."""


class GraphError(NNglassError):
    """A graph is malformed: bad structure, unknown op, bad reference, too large."""


class MalformedError(GraphError):
    """The bytes are not a graph at all (not UTF-8, not JSON)."""


class VersionError(GraphError):
    """The graph's wire version is not one this side speaks."""


class ExecutionError(NNglassError):
    """A node failed while the model ran (shape error, bad index, ...)."""


class TimeLimitError(ExecutionError):
    """A run went past its time limit (checked in every hook)."""


class ResourceLimitError(ExecutionError):
    """A node would go over a server's resource limit (bytes one op makes, bytes a run holds)."""


class OutOfOrderError(ExecutionError):
    """A value was needed before the model produced it, or a site never ran."""


class PolicyError(NNglassError):
    """The graph touches something the model's exposure policy forbids."""


class RemoteError(NNglassError):
    """The service refused or failed a job."""


# --- the service's own refusals (server/app.py maps each to its HTTP status) ------------


class ConfigError(NNglassError):
    """A server config file is wrong (unknown key, wrong type, bad pattern)."""


class AuthError(NNglassError):
    """No API key, or one that is unknown or revoked."""


class NotFoundError(NNglassError):
    """No such model, or no such job for this key."""


class TooLargeError(NNglassError):
    """The request is over the server's size limit."""


class QuotaError(NNglassError):
    """This key has too many jobs waiting."""


class UnavailableError(NNglassError):
    """The server cannot answer now (e.g. its database is busy); try again shortly."""
