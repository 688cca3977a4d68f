"""Server interceptors every service gets, on grpc-interceptor's ``AsyncServerInterceptor``:
exception mapping (domain errors -> google.rpc.Status) and per-RPC access logs. Metrics and auth
interceptors (metrics.py, auth.py) are built the same way.

grpc-interceptor calls ``intercept(method, request, context, method_name)`` once per RPC. For a
response-streaming RPC that returns the stream's async generator unstarted, so an interceptor that
must see how the whole RPC ended (an error raised after some messages were sent, a caller who left)
returns a generator of its own around it: ``ObservingInterceptor`` does that for a context manager.
``StreamWritingInterceptor``, innermost, makes every stream write its messages from inside that chain.

Handlers must be ``async def`` (coroutines or async generators), as every DreamFrame servicer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from grpc_interceptor.exception_to_status import AsyncExceptionToStatusInterceptor
from grpc_interceptor.server import AsyncServerInterceptor
from grpc_status import rpc_status

from dreamframe.config import CALLER_ROLES
from dreamframe.errors import DreamFrameError
from dreamframe.logging import get_logger
from dreamframe.serving.errors import rich_status, status_code_for

_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
# Codes that mean the server failed (logged as errors); everything else is the caller's business.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


@dataclass(frozen=True)
class RpcInfo:
    """What an interceptor knows about the call: ``/dreamframe.v1.PlotService/GenerateStory``."""

    method: str
    service: str
    name: str
    type: str

    @classmethod
    def of(cls, method_name: str | bytes, request: Any, response: Any) -> RpcInfo:
        """From the call's name, its request and what the next handler returned. grpc-interceptor
        hands a streaming side over as an async iterator (grpc.aio's request reader; its own
        generator around every inner interceptor's response stream), a unary one as a message or
        coroutine, so the shapes tell the RPC's type."""
        method = method_name.decode() if isinstance(method_name, bytes) else method_name
        service, _, name = method.lstrip("/").partition("/")
        kind = _TYPES[(hasattr(request, "__aiter__"), hasattr(response, "__aiter__"))]
        return cls(method=method, service=service, name=name, type=kind)


_RANK = {role: rank for rank, role in enumerate(CALLER_ROLES)}
ANONYMOUS = "anonymous"  # logs and metrics: no caller known (auth off, or rejected before it was known)


@dataclass(frozen=True)
class Caller:
    """Who is calling (auth.py finds it from the token). ``name`` and ``team`` come from the
    configuration: bounded and key-safe, fit for logs, metrics labels and storage keys."""

    name: str
    team: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this caller's role includes ``role`` (read ⊂ submit ⊂ admin)."""
        return _RANK[self.role] >= _RANK[role]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Set by the auth interceptor; grpc.aio runs each RPC in a task of its own, so it never leaks between
# RPCs, and the outer interceptors (logs, metrics) read it in the same task once the RPC ends.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("dreamframe_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being handled; None when auth is off (or outside an RPC)."""
    return _CALLER.get()


def set_current_caller(caller: Caller | None) -> None:
    _CALLER.set(caller)


def outcome_code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with, as seen from inside the server (for logs and metrics)."""
    if exc is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    return status_code_for(exc)


async def abort(
    context: Any,
    code: grpc.StatusCode,
    message: str,
    *,
    field: str | None = None,
    description: str | None = None,
) -> NoReturn:
    """End the RPC with ``code``/``message`` and its google.rpc.Status (see ``rich_status``)."""
    status = rpc_status.to_status(rich_status(code, message, field=field, description=description))
    # Keep trailers the handler set itself; abort would otherwise replace them.
    trailers = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
    await context.abort(status.code, status.details, trailing_metadata=trailers)
    raise AssertionError("context.abort returned")  # it always raises AbortError


class ObservingInterceptor(AsyncServerInterceptor):
    """Base class: run every RPC, all of a stream included, inside ``self.observe(rpc, context)``.

    ``observe`` returns a context manager; it sees the exception the RPC ended with.
    """

    def observe(self, rpc: RpcInfo, context: Any) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
        response = method(request, context)
        rpc = RpcInfo.of(method_name, request, response)
        if hasattr(response, "__aiter__"):
            return self._stream(rpc, response, context)
        with self.observe(rpc, context):
            return await response

    async def _stream(self, rpc: RpcInfo, response: Any, context: Any) -> AsyncIterator[Any]:
        with self.observe(rpc, context):
            async for message in response:  # none: StreamWritingInterceptor wrote them
                yield message


class StreamWritingInterceptor(AsyncServerInterceptor):
    """Innermost: a handler's async generator is drained here, each message sent with context.write.

    The one adapter grpc-interceptor needs. grpc.aio sends an async generator's messages itself,
    *outside* the generator, and neither it nor grpc-interceptor's stream wrappers close an abandoned
    generator: a caller leaving during a send would leave every interceptor's and the handler's
    generator to the garbage collector, which closes them after grpc released the call (when
    ``context.peer()`` crashes the process, logs and metrics come late and the handler stops its work
    late). Sending from here, inside the chain, makes that cancellation land in every interceptor's
    try block within the RPC's task, and ``aclosing`` runs the handler's finally blocks at once.
    """

    async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
        response = method(request, context)
        if not hasattr(response, "__aiter__"):
            return await response  # unary, or a stream the handler writes with context.write
        async with contextlib.aclosing(response) as messages:
            async for message in messages:
                await context.write(message)
        return None


class ExceptionInterceptor(AsyncExceptionToStatusInterceptor):
    """Domain errors -> their status code and a google.rpc.Status naming the field (the kserve way).

    Anything unexpected becomes INTERNAL with a generic message and an error id; the traceback goes
    only to the log (under the same id), never to the caller. grpc-interceptor's base class runs
    ``handle_exception`` for errors of unary calls and of streams, also after messages were sent;
    cancellation (not an ``Exception``) passes through untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._log = get_logger("dreamframe.serving")

    async def handle_exception(
        self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str
    ) -> NoReturn:
        if isinstance(ex, grpc.aio.AbortError):
            raise ex  # the handler (or auth) chose its status itself
        if isinstance(ex, DreamFrameError):
            await abort(context, status_code_for(ex), str(ex), field=ex.field, description=ex.message)
        elif isinstance(ex, NotImplementedError):
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, f"{method_name} is not implemented")
        else:
            error_id = uuid.uuid4().hex[:12]
            self._log.error("unhandled exception", rpc=method_name, error_id=error_id, exc_info=ex)
            message = f"internal error (error id {error_id}; details are in the server log)"
            await abort(context, grpc.StatusCode.INTERNAL, message)


class AccessLogInterceptor(ObservingInterceptor):
    """One structured log line per RPC: method, code, duration, peer, and the caller (name, team, role;
    ``anonymous`` when none is known).

    The method is bound into structlog's context vars while the handler runs, so the handler's own
    log lines carry it too. Health checks and reflection log at DEBUG (probes call every few seconds).
    """

    QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

    def __init__(self, service_name: str = "") -> None:
        self._log = get_logger("dreamframe.serving.access")
        if service_name:
            self._log = self._log.bind(service=service_name)

    @contextlib.contextmanager
    def observe(self, rpc: RpcInfo, context: Any) -> Iterator[None]:
        start = time.perf_counter()
        exc: BaseException | None = None
        with structlog.contextvars.bound_contextvars(rpc=rpc.method):
            try:
                yield
            except BaseException as e:
                exc = e
                raise
            finally:
                code = outcome_code(context, exc)
                if code in SERVER_FAULTS:
                    log = self._log.error
                elif rpc.service in self.QUIET_SERVICES:
                    log = self._log.debug
                else:
                    log = self._log.info
                caller = current_caller()
                log(
                    "rpc finished",
                    method=rpc.method,
                    code=code.name,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    peer=context.peer(),
                    caller=caller.name if caller else ANONYMOUS,
                    team=caller.team if caller else ANONYMOUS,
                    role=caller.role if caller else ANONYMOUS,
                )
