"""Waiting for a stage's service to be ready before calling it.

A GPU service answers NOT_SERVING on gRPC health while it loads its models (and, for the renderer with
compile on, compiles its first batch): minutes at real size. The coordinator asks health before each
stage's call and waits, up to ``coordinator.service_ready_timeout_s``, instead of letting the call's
deadline or gRPC's few UNAVAILABLE retries count model loading. A service that never becomes ready ends
the stage with UNAVAILABLE naming the service, its address, what health last said, and the setting.

Renderer replicas found by discovery (Kubernetes EndpointSlices, DNS of a headless Service) are ready by
construction: readiness probes decide who is listed. A static list (the local runner) is waited for here:
the render stage starts once at least one replica is SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe.errors import Unavailable

log = logging.getLogger(__name__)

SETTING = "coordinator.service_ready_timeout_s"
SERVING = health_pb2.HealthCheckResponse.SERVING
# One health Check may take this long (a loaded host); the wait as a whole is the setting.
CHECK_TIMEOUT_S = 5.0


@dataclass
class _Target:
    address: str
    stub: health_pb2_grpc.HealthStub


class ServiceReadiness:
    """``await readiness.wait("style-trainer")``: returns once the service's health says SERVING."""

    def __init__(
        self,
        connect: Callable[[str], grpc.aio.Channel],
        addresses: dict[str, list[str]],
        *,
        timeout_s: float,
        poll_s: float = 0.5,
    ) -> None:
        """``addresses``: service name → its addresses (several: ready when any one is)."""
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.channels: list[grpc.aio.Channel] = []
        self._targets: dict[str, list[_Target]] = {}
        for service, targets in addresses.items():
            found = []
            for address in targets:
                channel = connect(address)
                self.channels.append(channel)
                found.append(_Target(address, health_pb2_grpc.HealthStub(channel)))
            self._targets[service] = found

    def knows(self, service: str) -> bool:
        return bool(self._targets.get(service))

    async def _status(self, target: _Target, timeout: float) -> str:
        try:
            reply = await target.stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable ({exc.code().name})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait(self, service: str) -> None:
        """Return when ``service`` (any of its addresses) is SERVING; Unavailable after the timeout.
        A service this coordinator has no address for, or a timeout of 0, is not waited for."""
        targets = self._targets.get(service)
        if not targets or self.timeout_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        logged = False
        while True:
            left = deadline - loop.time()
            statuses = await asyncio.gather(
                *(self._status(t, max(0.1, min(CHECK_TIMEOUT_S, left))) for t in targets)
            )
            if "SERVING" in statuses:
                if logged:
                    log.info("%s is ready", service)
                return
            seen = ", ".join(f"{t.address} {s}" for t, s in zip(targets, statuses, strict=True))
            if loop.time() >= deadline:
                raise Unavailable(
                    f"{service} was not ready within {self.timeout_s:.0f} s (last health: {seen}); it may "
                    "still be loading or compiling its models (see its log), or raise the setting",
                    field=SETTING,
                )
            if not logged:
                log.info("waiting up to %.0f s for %s to be ready (%s)", self.timeout_s, service, seen)
                logged = True
            await asyncio.sleep(min(self.poll_s, max(0.0, deadline - loop.time())))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
