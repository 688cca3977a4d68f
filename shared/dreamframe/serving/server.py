"""The one way every DreamFrame service runs its gRPC server.

``GrpcServer`` wires what each service must have (DESIGN.md, "Rules of the road"): message size limits,
exception mapping, optional bearer-token auth, Prometheus metrics, access logs, health checking that
follows the service's real readiness, reflection, optional (m)TLS, and a graceful SIGTERM shutdown.
A service supplies only its servicers, a readiness check and shutdown hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dreamframe.config import ServerSettings, Settings, get_settings
from dreamframe.errors import InvalidArgument
from dreamframe.logging import configure_logging, get_logger
from dreamframe.serving.auth import CallerAuthInterceptor
from dreamframe.serving.health import (
    HEALTH_SERVICE_NAME,
    NOT_SERVING,
    SERVING,
    HealthServicer,
    start_health_server,
)
from dreamframe.serving.interceptors import (
    AccessLogInterceptor,
    ExceptionInterceptor,
    StreamWritingInterceptor,
)
from dreamframe.serving.metrics import MetricsInterceptor, ServerMetrics

Readiness = Callable[[], Awaitable[bool] | bool]
ShutdownHook = Callable[[], Awaitable[Any]]


class ServiceCannotStart(RuntimeError):
    """The readiness check failed in a way no retry can mend (a package missing from the image): the
    service stops and exits non-zero instead of answering NOT_SERVING until someone notices."""


@dataclass(frozen=True)
class Registration:
    """One servicer to serve: the generated ``add_XServicer_to_server``, the servicer, its full name."""

    add_to_server: Callable[[Any, Any], None]
    servicer: Any
    service_name: str

    @classmethod
    def of(cls, pb2: ModuleType, add_to_server: Callable[[Any, Any], None], servicer: Any) -> Registration:
        """Derive the full service name from the pb2 DESCRIPTOR, e.g.
        ``Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, PlotServicer())``.
        """
        short = add_to_server.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
        service = pb2.DESCRIPTOR.services_by_name.get(short)
        if service is None:
            raise ValueError(f"{pb2.__name__} defines no service {short!r} (from {add_to_server.__name__})")
        return cls(add_to_server, servicer, service.full_name)


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


class UndecodableRequest:
    """Stands in for a request message whose bytes did not parse (see ``DecodeGuardInterceptor``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<undecodable request>"


UNDECODABLE = UndecodableRequest()

_HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse → INVALID_ARGUMENT on every method (grpc.aio answers UNKNOWN).

    grpc.aio parses a request with the chosen handler's ``request_deserializer`` before any behaviour
    runs, so a DecodeError never reaches ExceptionInterceptor. Last in the list, this wraps the
    registered handler of every method (health and reflection too): its deserializer returns
    ``UNDECODABLE`` instead of raising (the outer interceptors pass it on as the request), and its
    behaviour raises InvalidArgument for it, which ExceptionInterceptor maps like any domain error.
    Streaming requests are checked message by message.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        attr, factory = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        return factory(
            _guarded(getattr(handler, attr), method, handler.request_streaming),
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError; also a message nested past protobuf's recursion limit
            return UNDECODABLE

    return safe


def _refusal(method: str) -> InvalidArgument:
    return InvalidArgument(f"the request bytes do not parse as the request message of {method}")


def _guarded(behavior: Callable[..., Any], method: str, request_streaming: bool) -> Callable[..., Any]:
    """``behavior`` of the same kind (coroutine or async generator) that refuses ``UNDECODABLE``."""

    def check(request: Any) -> Any:
        if request is UNDECODABLE:
            raise _refusal(method)
        if request_streaming:
            return _checked_stream(request, method)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: Any) -> Any:
            async with contextlib.aclosing(behavior(check(request), context)) as responses:
                async for response in responses:
                    yield response

        return guarded_stream

    async def guarded(request: Any, context: Any) -> Any:
        return await behavior(check(request), context)

    return guarded


async def _checked_stream(requests: Any, method: str) -> Any:
    async for request in requests:
        if request is UNDECODABLE:
            raise _refusal(method)
        yield request


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files, or None for plaintext."""
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("server.tls_client_ca_file needs server.tls_cert_file and server.tls_key_file")
        return None
    if cert is None or key is None:
        raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes() if ca else None,
        require_client_auth=ca is not None,
    )


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = []
    if settings.max_connection_age_seconds > 0:
        # GOAWAY after this age: round-robin clients re-resolve DNS and find replicas added by scaling.
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)))
        if settings.max_connection_age_grace_seconds is not None:
            grace_ms = int(settings.max_connection_age_grace_seconds * 1000)
            options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options + [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Notice dead peers on hours-long streams.
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept the clients' keepalive (client.keepalive_seconds) during long quiet calls. The channel
        # argument is GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, whose string differs from the
        # macro: a misspelt name is silently ignored, leaving gRPC's 5-minute default.
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval_seconds * 1000)),
        # Two processes configured with the same port must fail, not silently share it.
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    """A grpc.aio server with DreamFrame's standard equipment. Use ``run_forever`` from ``main``.

    ``readiness`` is polled every ``readiness_interval`` seconds: health answers NOT_SERVING until it
    returns True (and again whenever it returns False or raises). ``shutdown_hooks`` run when shutdown
    begins, while in-flight RPCs still have the grace period: use them to ask long work to checkpoint
    and stop. Release resources after ``run_forever`` returns.
    """

    def __init__(
        self,
        registrations: Sequence[Registration],
        settings: ServerSettings,
        *,
        service_name: str,
        readiness: Readiness | None = None,
        shutdown_hooks: Sequence[ShutdownHook] = (),
        readiness_interval: float = 5.0,
        readiness_timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = settings
        self.service_name = service_name
        self.registrations = list(registrations)
        self._readiness = readiness
        self._shutdown_hooks = list(shutdown_hooks)
        self._readiness_interval = readiness_interval
        self._readiness_timeout = readiness_timeout
        self._extra_interceptors = list(interceptors)
        self._extra_options = list(options)
        self._log = get_logger("dreamframe.serving", service=service_name)
        self.health = HealthServicer([r.service_name for r in self.registrations])
        self.metrics = ServerMetrics(service_name)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._server: grpc.aio.Server | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        self._force_stop: asyncio.Task[None] | None = None
        self.cannot_start: ServiceCannotStart | None = None

    @property
    def address(self) -> str:
        """host:port to dial (the bound port, also when the settings said 0)."""
        if self.port is None:
            raise RuntimeError("server not started")
        return _host_port(self.settings.host, self.port)

    @property
    def service_names(self) -> list[str]:
        return [r.service_name for r in self.registrations]

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("server already started")
        s = self.settings
        creds = server_credentials(s)  # before creating the server: bad TLS settings fail fast
        # Outermost first: metrics and logs see every outcome, including auth rejections.
        auth = CallerAuthInterceptor(s.all_callers)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MetricsInterceptor(self.metrics),
            AccessLogInterceptor(self.service_name),
            *([auth] if auth.enabled else []),  # no tokens configured: no per-RPC layer for nothing
            *self._extra_interceptors,
            ExceptionInterceptor(),
            StreamWritingInterceptor(),  # innermost of the wrappers that see results: see its docstring
            DecodeGuardInterceptor(),  # sets the deserializer grpc uses; refuses inside ExceptionInterceptor
        ]
        server = grpc.aio.server(
            interceptors=interceptors, options=[*server_options(s), *self._extra_options]
        )
        address = _host_port(s.host, s.port)
        try:
            for reg in self.registrations:
                reg.add_to_server(reg.servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                [*self.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
            )
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
            if not port:
                raise RuntimeError(f"could not bind {address}")
            await server.start()
            if s.metrics_port >= 0:
                self.metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
            if s.health_port >= 0:  # plaintext health alone, for Kubernetes' probes (they lack TLS)
                health_address = _host_port(s.host, s.health_port)
                self._health_server, self.health_port = await start_health_server(self.health, health_address)
        except BaseException:
            if self._health_server is not None:
                await self._health_server.stop(None)
                self._health_server = None
            # An aio server left unstopped crashes the process when collected after its loop closed; and
            # the traceback of the error we re-raise must not keep this one alive past its loop either.
            await server.stop(None)
            del server
            raise
        self._server, self.port = server, port
        self._log.info(
            "server started",
            address=self.address,
            tls=creds is not None,
            mtls=s.tls_client_ca_file is not None,
            auth=auth.enabled,
            callers=len(s.all_callers),
            metrics_port=self.metrics_port,
            services=self.service_names,
        )
        if self._readiness is None:
            self._set_ready(True)
        else:
            self._readiness_task = asyncio.create_task(self._readiness_loop(), name="readiness")

    async def _check_ready(self) -> bool:
        assert self._readiness is not None
        try:
            result = self._readiness()
            if inspect.isawaitable(result):  # a plain function returning bool works too
                result = await asyncio.wait_for(result, timeout=self._readiness_timeout)
            return bool(result)
        except ImportError as exc:  # missing from this image: waiting will not bring it
            self._log.error("readiness check cannot succeed: stopping", error=repr(exc))
            self.cannot_start = ServiceCannotStart(f"{self.service_name}: readiness check failed: {exc!r}")
            self.request_stop("readiness check cannot succeed")
            return False
        except Exception as exc:
            if self._ready is not False:
                self._log.warning("readiness check failed", error=repr(exc))
            return False

    async def _readiness_loop(self) -> None:
        while True:
            self._set_ready(await self._check_ready())
            await asyncio.sleep(self._readiness_interval)

    def _set_ready(self, ready: bool) -> None:
        if ready == self._ready or (self._stop_task is not None):
            return
        self._ready = ready
        self.health.set_all(SERVING if ready else NOT_SERVING)
        self.metrics.ready.set(1 if ready else 0)
        self._log.info("serving" if ready else "not serving", health="SERVING" if ready else "NOT_SERVING")

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, run shutdown hooks, give in-flight RPCs ``grace`` seconds.

        ``grace`` defaults to ``settings.grace_seconds``; calling again (e.g. a second signal) with a
        smaller grace ends the wait sooner.
        """
        if self._server is None:
            return
        grace = self.settings.grace_seconds if grace is None else grace
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(grace), name="grpc-server-stop")
        else:
            await self._server.stop(grace)  # tightens the grace of the stop already running
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        assert self._server is not None
        started = time.monotonic()
        self._log.info("shutting down", grace_seconds=grace)
        if self._readiness_task is not None:
            self._readiness_task.cancel()
        self.health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        # server.stop refuses new RPCs at once, then waits up to grace for in-flight ones.
        drain = asyncio.create_task(self._server.stop(grace), name="grpc-drain")
        await asyncio.sleep(0)
        if self._shutdown_hooks:
            await self._run_hooks(timeout=max(grace, 1.0))
        await drain
        if self._health_server is not None:  # probes saw NOT_SERVING until the drain ended
            await self._health_server.stop(None)
        await self.metrics.close()
        self._log.info("server stopped", seconds=round(time.monotonic() - started, 3))

    async def _run_hooks(self, timeout: float) -> None:
        async def run(hook: ShutdownHook) -> None:
            try:
                await hook()
            except Exception as exc:
                self._log.error(
                    "shutdown hook failed", hook=getattr(hook, "__qualname__", repr(hook)), exc_info=exc
                )

        try:
            await asyncio.wait_for(asyncio.gather(*(run(h) for h in self._shutdown_hooks)), timeout=timeout)
        except TimeoutError:
            self._log.error("shutdown hooks did not finish in time", timeout_seconds=timeout)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def request_stop(self, reason: str = "requested") -> None:
        """Begin shutdown from a signal handler or another task; ``run_forever`` then stops."""
        if self._stop_requested is None:
            return
        if self._stop_requested.is_set():
            # A second signal: stop waiting for in-flight RPCs.
            self._log.warning("second stop request: cancelling in-flight RPCs", reason=reason)
            if self._server is not None:
                self._force_stop = asyncio.get_running_loop().create_task(self._server.stop(0))
            return
        self._log.info("stop requested", reason=reason)
        self._stop_requested.set()

    async def run_forever(self, *, handle_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), shut down gracefully, return.

        Returning normally lets ``asyncio.run(...)`` in ``main`` exit with status 0; a readiness check
        that can never succeed raises ``ServiceCannotStart`` after the shutdown.
        """
        loop = asyncio.get_running_loop()
        # Blocking work in handlers goes through asyncio.to_thread; bound it by max_workers.
        loop.set_default_executor(ThreadPoolExecutor(self.settings.max_workers, thread_name_prefix="handler"))
        self._stop_requested = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            if self._server is None:
                await self.start()
            await self._stop_requested.wait()
        finally:
            try:
                await self.stop()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)
        if self.cannot_start is not None:
            raise self.cannot_start

    async def __aenter__(self) -> GrpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(
    registrations: Sequence[Registration],
    settings: ServerSettings,
    *,
    service_name: str,
    readiness: Readiness | None = None,
    shutdown_hooks: Sequence[ShutdownHook] = (),
    **kwargs: Any,
) -> None:
    """Run a service until SIGTERM/SIGINT: ``asyncio.run(serve(...))`` from its ``main()``."""
    server = GrpcServer(
        registrations,
        settings,
        service_name=service_name,
        readiness=readiness,
        shutdown_hooks=shutdown_hooks,
        **kwargs,
    )
    await server.run_forever()


def run_service(amain: Callable[[Settings], Awaitable[Any]]) -> None:
    """A service's ``main()``: its settings (environment and optional file), logging configured from
    them, then ``asyncio.run(amain(settings))``."""
    settings = get_settings()
    configure_logging(settings.log)
    try:
        asyncio.run(amain(settings))
    except ServiceCannotStart as exc:  # logged already; exit non-zero so a supervisor sees it at once
        raise SystemExit(f"{exc}; exiting") from None
