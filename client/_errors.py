"""The SDK's exceptions: one hierarchy, carrying the server's status code and message.

No ``grpc.RpcError`` reaches the caller: every failed call raises a ``CnndError`` subclass
chosen by the status code, with the server's field violations (google.rpc.BadRequest) when
it sent them.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class CnndError(Exception):
    """Base class. ``code`` is the gRPC status code's name ("NOT_FOUND", ...)."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fields = fields or {}  # field path -> what is wrong with it

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(CnndError):
    code = "INVALID_ARGUMENT"


class NotFound(CnndError):
    code = "NOT_FOUND"


class AlreadyExists(CnndError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(CnndError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(CnndError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(CnndError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CnndError):
    code = "PERMISSION_DENIED"


class Unavailable(CnndError):
    """The server cannot be reached, or is shutting down; retrying later may work."""

    code = "UNAVAILABLE"


class DeadlineExceeded(CnndError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(CnndError):
    code = "CANCELLED"


class InternalError(CnndError):
    """A server bug; the message carries an id to find it in the server's log."""

    code = "INTERNAL"


class JobFailed(CnndError):
    """Raised by ``Job.wait(raise_on_failure=True)`` when a job ends FAILED or CANCELLED."""

    code = "FAILED"


_BY_CODE: dict[grpc.StatusCode, type[CnndError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(e: grpc.RpcError) -> CnndError:
    """The CnndError for a failed call, with BadRequest field violations when present."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    message = (e.details() if hasattr(e, "details") else None) or str(code)
    fields: dict[str, str] = {}
    try:
        status = rpc_status.from_call(e)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.update({v.field: v.description for v in bad.field_violations})
    cls = _BY_CODE.get(code, CnndError)
    return cls(message, code.name if cls is CnndError else None, fields)


def from_status(code: int, message: str) -> CnndError:
    """The CnndError for a google.rpc.Status carried inside a response (InferStream)."""
    for status_code, cls in _BY_CODE.items():
        if status_code.value[0] == code:
            return cls(message)
    return CnndError(message, "UNKNOWN")
