"""One exception hierarchy for everything the daemon can refuse.

Every error the daemon answers becomes an :class:`OffloaddError` subclass named after its gRPC
status code, carrying the daemon's own message (which says what to do). The onload fast path
answers with the same codes, so a refusal looks the same whichever way it came.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import grpc


class OffloaddError(Exception):
    """Base of every error this package raises for a daemon's answer."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(OffloaddError):
    code = grpc.StatusCode.CANCELLED


class Unknown(OffloaddError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(OffloaddError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(OffloaddError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(OffloaddError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OffloaddError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(OffloaddError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OffloaddError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(OffloaddError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(OffloaddError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(OffloaddError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(OffloaddError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(OffloaddError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(OffloaddError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(OffloaddError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(OffloaddError):
    code = grpc.StatusCode.UNAUTHENTICATED


class LeaseLost(NotFound):
    """The lease ended (its ttl passed, the daemon restarted, or it was detached).

    Views taken from it may no longer hold what the daemon serves, so every later use raises
    this; attach again for a fresh lease.
    """


class UnknownTensor(OffloaddError, KeyError):
    """A weight name the lease does not hold; the message names the closest matches."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str, known: Iterable[str]) -> None:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        super().__init__(f"the lease holds no tensor {name!r}{hint}")
        self.name = name
        self.closest = close

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


_BY_CODE: dict[grpc.StatusCode, type[OffloaddError]] = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_for(code: grpc.StatusCode | int, message: str) -> OffloaddError:
    """The exception for a status code (a ``grpc.StatusCode`` or its number, as the onload fast
    path sends it) and the daemon's message."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, Unknown)(message)


def from_rpc_error(e: grpc.RpcError) -> OffloaddError:
    """Converts what grpcio raises into our hierarchy, keeping the daemon's message."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    return error_for(code, details or str(code))
