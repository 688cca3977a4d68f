"""Server interceptors every service gets: exception mapping and per-RPC access logs.

grpc.aio interceptors only see the handler *lookup*; to act around the call itself each interceptor
returns a copy of the handler whose behaviour is wrapped (``WrappingInterceptor``). Streaming handlers,
whether async generators or ``context.write`` coroutines, are run as one coroutine that writes each
message, so an ``around`` hook sees every exception, including one raised after messages were sent,
and cancellation, in a single try block.

Handlers must be ``async def`` (coroutines or async generators), as every DreamFrame servicer is.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from dreamframe.errors import DreamFrameError
from dreamframe.logging import get_logger
from dreamframe.serving.errors import detail_metadata, error_detail, status_code_for

# Invoke the wrapped handler with (possibly a proxy of) the servicer context.
Invoke = Callable[[Any], Awaitable[Any]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
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
    def of(cls, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler) -> RpcInfo:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.lstrip("/").partition("/")
        kind = _TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return cls(method=method, service=service, name=name, type=kind)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def rebuild_handler(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any], *, keep_deserializer: bool = True
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` running ``behavior``."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer if keep_deserializer else None,
        response_serializer=handler.response_serializer,
    )


async def _drain(result: Any, context: Any) -> None:
    """Run a response-streaming handler's result to completion, writing each message."""
    if hasattr(result, "__aiter__"):
        # aclosing: if a write fails, the generator's finally blocks still run now, not at GC.
        async with contextlib.aclosing(result) as messages:
            async for message in messages:
                await context.write(message)
    elif inspect.isawaitable(result):
        await result  # a coroutine that writes through context.write itself
    elif result is not None:
        for message in result:
            await context.write(message)


def wrap_handler(
    handler: grpc.RpcMethodHandler, around: Callable[[Invoke, Any], Awaitable[Any]]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run inside ``await around(invoke, context)``."""
    inner = _behavior(handler)
    if handler.response_streaming:

        async def streaming(request: Any, context: Any) -> None:
            async def invoke(ctx: Any) -> None:
                await _drain(inner(request, ctx), ctx)

            await around(invoke, context)

        return rebuild_handler(handler, streaming)

    async def unary(request: Any, context: Any) -> Any:
        async def invoke(ctx: Any) -> Any:
            result = inner(request, ctx)
            return await result if inspect.isawaitable(result) else result

        return await around(invoke, context)

    return rebuild_handler(handler, unary)


def rejecting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, *, field: str | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape that fails every call with ``code`` (request bytes are not parsed)."""
    trailers = detail_metadata(error_detail(code, field=field, description=message))

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message, trailing_metadata=trailers)

    return rebuild_handler(handler, reject, keep_deserializer=False)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base class: run every matching RPC inside ``self.around(rpc, invoke, context)``."""

    def applies_to(self, rpc: RpcInfo) -> bool:
        return True

    async def around(self, rpc: RpcInfo, invoke: Invoke, context: Any) -> Any:
        return await invoke(context)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        rpc = RpcInfo.of(handler_call_details, handler)
        if not self.applies_to(rpc):
            return handler

        async def around(invoke: Invoke, context: Any) -> Any:
            return await self.around(rpc, invoke, context)

        return wrap_handler(handler, around)


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


class ExceptionInterceptor(WrappingInterceptor):
    """Domain errors -> their status code, message naming the field, ErrorDetail in the trailers.

    Anything unexpected becomes INTERNAL with a generic message and an error id; the traceback goes
    only to the log (under the same id), never to the caller.
    """

    def __init__(self) -> None:
        self._log = get_logger("dreamframe.serving")

    async def around(self, rpc: RpcInfo, invoke: Invoke, context: Any) -> Any:
        try:
            return await invoke(context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # cancelled by the caller/deadline, or the handler chose its status itself
        except DreamFrameError as exc:
            code = status_code_for(exc)
            detail = error_detail(code, field=exc.field, description=exc.message)
            await self._abort(context, code, str(exc), detail)
        except NotImplementedError:
            code = grpc.StatusCode.UNIMPLEMENTED
            message = f"{rpc.method} is not implemented"
            await self._abort(context, code, message, error_detail(code, description=message))
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            self._log.error("unhandled exception", rpc=rpc.method, error_id=error_id, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (error id {error_id}; details are in the server log)"
            await self._abort(context, code, message, error_detail(code, description=message))

    @staticmethod
    async def _abort(context: Any, code: grpc.StatusCode, message: str, detail: Any) -> None:
        # Keep trailers the handler set itself; abort would otherwise replace them.
        trailers = tuple(context.trailing_metadata() or ()) + detail_metadata(detail)
        await context.abort(code, message, trailing_metadata=trailers)


class AccessLogInterceptor(WrappingInterceptor):
    """One structured log line per RPC: method, code, duration, peer.

    The method is bound into structlog's context vars while the handler runs, so the handler's own
    log lines carry it too. Health checks and reflection log at DEBUG (probes call every few seconds).
    """

    QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

    def __init__(self, service_name: str = "") -> None:
        self._log = get_logger("dreamframe.serving.access")
        if service_name:
            self._log = self._log.bind(service=service_name)

    async def around(self, rpc: RpcInfo, invoke: Invoke, context: Any) -> Any:
        start = time.perf_counter()
        exc: BaseException | None = None
        with structlog.contextvars.bound_contextvars(rpc=rpc.method):
            try:
                return await invoke(context)
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
                log(
                    "rpc finished",
                    method=rpc.method,
                    code=code.name,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    peer=context.peer(),
                )
