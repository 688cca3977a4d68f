"""Domain errors <-> gRPC status: the one table that turns DreamFrameError types into status codes.

The server attaches a ``dreamframe.v1.ErrorDetail`` to every error status as binary trailing metadata
(``dreamframe-error-bin``) so callers can read the offending field without parsing the message;
``error_detail_from`` reads it back and ``domain_error_from`` rebuilds the domain exception.
"""

from __future__ import annotations

import grpc

from dreamframe import errors
from dreamframe.v1 import common_pb2

ERROR_DETAIL_KEY = "dreamframe-error-bin"

STATUS_BY_ERROR: dict[type[errors.DreamFrameError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
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


def error_detail(
    code: grpc.StatusCode, *, field: str | None = None, description: str = ""
) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(reason=code.name, field=field or "", description=description)


def detail_metadata(detail: common_pb2.ErrorDetail) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``detail`` (binary keys must end in ``-bin``)."""
    return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)


def error_detail_from(error: grpc.RpcError) -> common_pb2.ErrorDetail | None:
    """The ErrorDetail a DreamFrame server attached to a failed call, or None.

    Works for ``grpc.aio.AioRpcError`` and for errors raised by sync stubs.
    """
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == ERROR_DETAIL_KEY:
            detail = common_pb2.ErrorDetail()
            detail.ParseFromString(value)
            return detail
    return None


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
