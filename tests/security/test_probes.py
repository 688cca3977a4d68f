"""Probes split (issue 19): a storage outage makes pods unready, it never makes Kubernetes restart them.

Liveness asks the health service "liveness" (SERVING while the process serves, NOT_SERVING only at
shutdown); readiness and startup ask "" (storage answers, models loaded). Real GrpcServer on 127.0.0.1,
real grpc.health.v1 clients, a real S3 client against an endpoint where nothing listens.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer
from dreamframe.serving.health import LIVENESS
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage.local import LocalStore
from dreamframe.storage.s3 import S3Store

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings() -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1.0)


async def check(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=3
        )
        return reply.status


async def wait_for(address: str, service: str, expected: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (status := await check(address, service)) != expected:
        assert asyncio.get_running_loop().time() < deadline, (service, status)
        await asyncio.sleep(0.05)


def test_storage_down_is_unready_but_alive():
    async def body() -> None:
        # MinIO gone: a real S3 client, nothing listening, no retries.
        down = S3Store(
            f"127.0.0.1:{closed_port()}",
            "ak",
            "sk",
            "dreamframe",
            create_bucket=False,
            max_retries=0,
            timeout_seconds=1.0,
        )
        ready = StorageReadiness(down, "jobs/")
        server = GrpcServer([], settings(), service_name="probe", readiness=ready, readiness_interval=0.05)
        async with server:
            await asyncio.sleep(0.3)  # several readiness rounds, all failing
            assert await check(server.address, "") == NOT_SERVING  # readiness/startup probe
            assert await check(server.address, LIVENESS) == SERVING  # liveness probe: no restart

    asyncio.run(asyncio.wait_for(body(), 20))


def test_liveness_ignores_readiness_changes_and_ends_at_shutdown(tmp_path):
    class Flaky(LocalStore):
        up = True

        def exists(self, key, *, bucket=None):
            if not self.up:
                raise ConnectionError("storage down")
            return super().exists(key, bucket=bucket)

    async def body() -> None:
        store = Flaky(tmp_path / "store", "dreamframe")
        server = GrpcServer(
            [],
            settings(),
            service_name="probe",
            readiness=StorageReadiness(store, "jobs/"),
            readiness_interval=0.05,
        )
        async with server:
            await wait_for(server.address, "", SERVING)
            Flaky.up = False
            await wait_for(server.address, "", NOT_SERVING)
            assert await check(server.address, LIVENESS) == SERVING
            Flaky.up = True
            await wait_for(server.address, "", SERVING)
            # Nothing a service sets reaches liveness; only shutdown does.
            server.health.set_all(NOT_SERVING)
            server.health.set(LIVENESS, NOT_SERVING)
            assert server.health.status(LIVENESS) == SERVING
            await server.stop(0.5)
            assert server.health.status(LIVENESS) == NOT_SERVING
            assert server.health.status("") == NOT_SERVING

    asyncio.run(asyncio.wait_for(body(), 20))
