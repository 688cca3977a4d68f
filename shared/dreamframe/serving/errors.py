"""Domain errors <-> gRPC status: the one table that turns DreamFrameError types into status codes.

Every error status carries the standard rich error model, a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (grpcio-status): the same human message, an ``ErrorInfo`` whose
reason is the canonical code name, and a ``BadRequest`` field violation when the error names a field.
Any gRPC client reads it with ``grpc_status.rpc_status.from_call``; ``error_detail_from`` does that
for our own callers and ``domain_error_from`` rebuilds the domain exception.

Messages, field names and descriptions are capped here (``MAX_MESSAGE_CHARS``), for every status any
service sends: an error about a huge bad value stays a short error, and its trailers stay far below
gRPC's 8 KiB metadata limit (over it, the caller would see RESOURCE_EXHAUSTED instead of the status).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dreamframe import errors
from dreamframe.limits import truncate

# ErrorInfo.domain: who defines the reasons (the API package).
ERROR_DOMAIN = "dreamframe.v1"
# The message and the field violation's description; dotted field paths get less.
MAX_MESSAGE_CHARS = 300
MAX_FIELD_CHARS = 120

STATUS_BY_ERROR: dict[type[errors.DreamFrameError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Aborted: grpc.StatusCode.ABORTED,
}
_ERROR_BY_STATUS = {code: cls for cls, code in STATUS_BY_ERROR.items()}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status an exception maps to; subclasses of a domain error map like their base."""
    if isinstance(exc, NotImplementedError):
        # The generated servicer base classes raise this for methods a service does not implement.
        return grpc.StatusCode.UNIMPLEMENTED
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(
    code: grpc.StatusCode, message: str, *, field: str | None = None, description: str | None = None
) -> status_pb2.Status:
    """The google.rpc.Status of a failed call. ``description`` is the field violation's text (the
    message without the field's name); it defaults to ``message``. Each is capped (see the module doc)."""
    message = truncate(message, MAX_MESSAGE_CHARS)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=code.name, domain=ERROR_DOMAIN))
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=truncate(field, MAX_FIELD_CHARS),
            description=truncate(description or message, MAX_MESSAGE_CHARS),
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


@dataclass(frozen=True)
class StatusDetail:
    """What a failed call's google.rpc.Status says, flattened for callers."""

    reason: str  # ErrorInfo.reason: the canonical code name, e.g. "INVALID_ARGUMENT"
    field: str  # dotted path of the offending request field, "" when none is named
    description: str  # what is wrong with the field (or the whole message when none is named)


def error_detail_from(error: grpc.RpcError) -> StatusDetail | None:
    """The reason and bad field a failed call's google.rpc.Status carries, or None without one.

    Works for ``grpc.aio.AioRpcError`` and for errors raised by sync stubs (both answer
    ``code()``/``details()``/``trailing_metadata()`` synchronously, as ``from_call`` needs).
    """
    if not callable(getattr(error, "trailing_metadata", None)):
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status proto that contradicts the call's code or message
        return None
    if status is None:
        return None
    reason, field, description = "", "", status.message
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field, description = bad.field_violations[0].field, bad.field_violations[0].description
    return StatusDetail(reason=reason, field=field, description=description)


def domain_error_from(error: grpc.RpcError) -> errors.DreamFrameError | None:
    """Rebuild the domain exception a downstream service raised (None for other status codes).

    Lets a service that calls another one re-raise, e.g., a NOT_FOUND as ``NotFound`` with its field.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    cls = _ERROR_BY_STATUS.get(code)  # type: ignore[arg-type]
    if cls is None:
        return None
    detail = error_detail_from(error)
    if detail is not None and detail.description:
        return cls(detail.description, field=detail.field or None)
    details = error.details() if callable(getattr(error, "details", None)) else None
    return cls(details or code.name)  # type: ignore[union-attr]
