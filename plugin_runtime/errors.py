"""Domain error hierarchy shared by both daemons.

Domain code raises these; it never imports grpc or touches a servicer context.
Each class names its gRPC status code as a string, and ``plugin_runtime.rpc``
is the one place that turns the name into a ``grpc.StatusCode``.  Keeping the
names as strings keeps this module importable from layers that must not depend
on grpc (matching, discovery, volumes, backends).
"""

from __future__ import annotations

from typing import ClassVar


class DomainError(Exception):
    """A known failure with a status code and a human-readable message."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"


class OutOfRange(DomainError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(DomainError):
    code = "RESOURCE_EXHAUSTED"


class Aborted(DomainError):
    """Another operation on the same object is in flight; the caller retries."""

    code = "ABORTED"


class Unimplemented(DomainError):
    code = "UNIMPLEMENTED"


class Unavailable(DomainError):
    code = "UNAVAILABLE"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(DomainError):
    code = "DEADLINE_EXCEEDED"


class Internal(DomainError):
    """A known internal failure (a tool failed, the kernel refused) with its cause."""

    code = "INTERNAL"
