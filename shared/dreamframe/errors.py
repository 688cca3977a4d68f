"""Domain errors. Domain modules raise these; serving maps them to gRPC status codes in one place.

Every error can name the request field it is about (dotted path, e.g. ``options.steps``) so callers
see *which* input was wrong, not just that something was.
"""

from __future__ import annotations


def described(exc: BaseException) -> str:
    """An exception as part of a message or a stored report: its type too, since some (a bare assert,
    a KeyError's key) say little or nothing alone."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class DreamFrameError(Exception):
    """Base of every error DreamFrame raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(DreamFrameError):
    """The caller sent something malformed (maps to INVALID_ARGUMENT)."""


class NotFound(DreamFrameError):
    """A named thing (object, job, run) does not exist (maps to NOT_FOUND)."""


class AlreadyExists(DreamFrameError):
    """Creating something that exists and may not be replaced (maps to ALREADY_EXISTS)."""


class PermissionDenied(DreamFrameError):
    """The caller is known but its role does not allow this (maps to PERMISSION_DENIED)."""


class FailedPrecondition(DreamFrameError):
    """The request is well-formed but the system is not in a state to do it (FAILED_PRECONDITION)."""


class Unavailable(DreamFrameError):
    """Not ready, or a dependency is down; retrying may help (maps to UNAVAILABLE)."""


class ResourceExhausted(DreamFrameError):
    """A limit was hit: too many jobs, message too large (maps to RESOURCE_EXHAUSTED)."""


class Aborted(DreamFrameError):
    """A conditional write lost to a concurrent writer (maps to ABORTED): re-read, then decide again."""


class Cancelled(DreamFrameError):
    """The work was cancelled by the caller or by shutdown (maps to CANCELLED)."""
