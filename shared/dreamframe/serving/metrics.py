"""Prometheus metrics for a gRPC server, on its own registry, served over HTTP.

Metric names follow go-grpc-prometheus (``grpc_server_handled_total`` etc.) so stock gRPC dashboards
work. Each server owns a ``CollectorRegistry``: several servers in one process (tests, ``make run``
variants) never collide. Services add their own metrics to ``ServerMetrics.registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from dreamframe import __version__
from dreamframe.serving.interceptors import (
    ANONYMOUS,
    ObservingInterceptor,
    RpcInfo,
    current_caller,
    outcome_code,
)

# RPCs range from a health check (ms) to a story render or a training run (hours).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
_LABELS = ("grpc_service", "grpc_method", "grpc_type")


class ServerMetrics:
    def __init__(self, service_name: str, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.started = Counter("grpc_server_started", "RPCs started.", _LABELS, registry=r)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed, by status code.", (*_LABELS, "grpc_code"), registry=r
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "RPC latency.", _LABELS, buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("grpc_server_in_flight", "RPCs being handled now.", _LABELS, registry=r)
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Stream messages sent to callers.", _LABELS, registry=r
        )
        # Who called: by team and role only (both from the configuration, so a bounded set; never a
        # token, never a caller-supplied string). "anonymous": auth off, or refused before it was known.
        self.handled_by_caller = Counter(
            "dreamframe_rpc_handled",
            "RPCs completed, by status code and the caller's team and role.",
            ("grpc_service", "grpc_method", "grpc_code", "team", "role"),
            registry=r,
        )
        self.ready = Gauge("dreamframe_ready", "1 while the service's readiness check passes.", registry=r)
        info = Gauge(
            "dreamframe_service_info", "The service this process runs.", ("service", "version"), registry=r
        )
        info.labels(service_name, __version__).set(1)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 picks a free port); returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            # shutdown() blocks until serve_forever notices (up to its 0.5 s poll): not on the loop.
            await asyncio.to_thread(http.shutdown)
            http.server_close()


class _CountingContext:
    """Servicer-context proxy counting the messages written (StreamWritingInterceptor sends those of
    async generators through context.write too)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.on_write: Callable[[], Any] | None = None  # set once the RPC's labels are known

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        if self.on_write is not None:
            self.on_write()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class MetricsInterceptor(ObservingInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
        # The handler gets the counting proxy; observe() learns the labels and starts the count.
        return await super().intercept(method, request, _CountingContext(context), method_name)

    @contextlib.contextmanager
    def observe(self, rpc: RpcInfo, context: Any) -> Iterator[None]:
        m = self.metrics
        labels = (rpc.service, rpc.name, rpc.type)
        m.started.labels(*labels).inc()
        if rpc.type in ("server_stream", "bidi_stream"):
            context.on_write = m.msg_sent.labels(*labels).inc
        in_flight = m.in_flight.labels(*labels)
        in_flight.inc()
        start = time.perf_counter()
        exc: BaseException | None = None
        try:
            yield
        except BaseException as e:
            exc = e
            raise
        finally:
            in_flight.dec()
            m.handling_seconds.labels(*labels).observe(time.perf_counter() - start)
            code = outcome_code(context, exc).name
            m.handled.labels(*labels, code).inc()
            caller = current_caller()
            team, role = (caller.team, caller.role) if caller else (ANONYMOUS, ANONYMOUS)
            m.handled_by_caller.labels(rpc.service, rpc.name, code, team, role).inc()
