"""Domain errors and their one mapping to gRPC statuses.

Handlers raise these; ``rpc_errors`` (a decorator on every servicer method) turns them into a
status with a message the caller can act on, plus google.rpc.BadRequest field violations for
validation errors. Anything else is a bug: it is logged with an id and answered as INTERNAL
with that id, never with a traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cnnd.core.spec import SpecError

log = logging.getLogger("cnnd.server")


class ServiceError(Exception):
    """An error a caller can act on; ``code`` is the gRPC status it becomes."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


def to_status_proto(error: ServiceError) -> status_pb2.Status:
    """google.rpc.Status for an error, with BadRequest details when a field is named."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    if error.field is not None:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message
                    )
                ]
            )
        )
        status.details.append(detail)
    return status


def internal_status(error_id: str) -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error {error_id}; the server log has the details",
    )


def _abort(context: grpc.ServicerContext, error: BaseException, method: str) -> None:
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error  # already aborted (an interceptor's context.abort inside the stream)
    if not context.is_active():  # the client went away (cancelled, deadline): nothing to answer
        log.info("rpc cancelled by the client", extra={"method": method})
        return
    if isinstance(error, SpecError):
        error = InvalidArgument(str(error), f"spec.{error.field}")
    if isinstance(error, ServiceError):
        log.info(
            "rpc failed",
            extra={"method": method, "code": error.code.name, "error": error.message},
        )
        context.abort_with_status(rpc_status.to_status(to_status_proto(error)))
    error_id = uuid.uuid4().hex[:12]
    log.exception("internal error %s in %s", error_id, method, extra={"error_id": error_id})
    context.abort_with_status(rpc_status.to_status(internal_status(error_id)))


F = TypeVar("F", bound=Callable[..., Any])


def rpc_errors(fn: F) -> F:
    """Map exceptions raised by a servicer method (unary or streaming) to gRPC statuses."""
    method = fn.__name__
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(self, request, context)
            except GeneratorExit:
                raise
            except Exception as e:
                _abort(context, e, method)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:
            _abort(context, e, method)

    return unary  # type: ignore[return-value]
