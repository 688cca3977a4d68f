"""grpc.health.v1 for grpc.aio, driven by the service's real readiness.

Same protocol and semantics as ``grpc_health.v1.health.aio.HealthServicer`` with one difference that
matters for graceful shutdown: a ``Watch`` stream ends (status OK) right after it has delivered
NOT_SERVING at shutdown. The stock servicer keeps Watch streams open forever, so any watcher (a client
doing health-checked load balancing) would hold ``server.stop(grace)`` for the whole grace period.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# What a liveness probe asks: SERVING while the process serves, NOT_SERVING only at shutdown. It never
# follows readiness, so a storage outage or a slow model load makes pods unready, never restarts them.
LIVENESS = "liveness"


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, services: list[str] | tuple[str, ...] = ()) -> None:
        # "" is the whole server (what Kubernetes' grpc probe asks by default): readiness.
        self._status: dict[str, int] = dict.fromkeys(["", *services], NOT_SERVING)
        self._status[LIVENESS] = SERVING
        self._shutting_down = False
        # Replaced on every change; a watcher grabs the current one before reading, so no change is missed.
        self._changed = asyncio.Event()

    def status(self, service: str = "") -> int | None:
        return self._status.get(service)

    def set(self, service: str, status: int) -> None:
        """Set one service's status (ignored once shutdown began: NOT_SERVING is final)."""
        if self._shutting_down or service == LIVENESS:
            return
        self._update({service: status})

    def set_all(self, status: int) -> None:
        """Every service's readiness; LIVENESS stays SERVING until shutdown."""
        if self._shutting_down:
            return
        self._update({k: status for k in self._status if k != LIVENESS})

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open Watch streams get it and then end."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._update(dict.fromkeys(self._status, NOT_SERVING), force=True)

    def _update(self, statuses: dict[str, int], *, force: bool = False) -> None:
        if not force and all(self._status.get(k) == v for k, v in statuses.items()):
            return
        self._status.update(statuses)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        last: int | None = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                return
            await changed.wait()


async def start_health_server(servicer: HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1 alone on ``address`` (``host:port``, port 0 picks one).

    Kubernetes' built-in gRPC probes cannot speak TLS, so with TLS on the service port the probes ask
    here. It answers SERVING/NOT_SERVING and nothing else: no service, no reflection, no metadata.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    if not port:
        await server.stop(None)
        raise RuntimeError(f"could not bind the health port {address}")
    await server.start()
    return server, port
