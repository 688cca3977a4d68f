"""CoordinatorService over gRPC: a thin adapter over ``runner.Coordinator``."""

from __future__ import annotations

import asyncio
import socket

from dreamframe import job_watch
from dreamframe.config import Settings, get_settings
from dreamframe.logging import configure_logging
from dreamframe.serving import GrpcServer, Registration, current_caller
from dreamframe.serving.auth import owner
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import open_store
from dreamframe.storage.base import ObjectStore
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc

from . import access
from .clients import Clients
from .leader import KubernetesLease, Leadership, Lease, StorageLease
from .runner import Coordinator
from .scaler import RendererScaler, shared_api_client

SERVICE = "coordinator"


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Jobs belong to the submitting caller's team (access.py); the roles per RPC are checked before
    any of this runs (dreamframe.serving.auth)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def SubmitJob(self, request, context):
        caller = current_caller()
        job = await self.coordinator.submit(request, **owner(caller))
        return pb.SubmitJobResponse(job=access.submitted(caller, job))

    async def GetJob(self, request, context):
        job = await self.coordinator.get(request.job_id)
        return pb.GetJobResponse(job=access.visible(current_caller(), job))

    async def ListJobs(self, request, context):
        team = access.listing_team(current_caller(), request.team)
        jobs, token = await self.coordinator.list(
            list(request.states), request.page_size, request.page_token, team=team
        )
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def WatchJob(self, request, context):
        caller = current_caller()
        previous = None
        async for job in self.coordinator.watch(request.job_id):
            job = access.visible(caller, job)
            update = job_watch.first(job) if previous is None else job_watch.changes(previous, job)
            previous = job
            if update is not None:
                yield update

    async def CancelJob(self, request, context):
        # Checked before cancelling: another team's job is left alone (and reported as unknown).
        access.visible(current_caller(), await self.coordinator.get(request.job_id))
        return pb.CancelJobResponse(job=await self.coordinator.cancel(request.job_id))


def build(settings: Settings) -> Coordinator:
    store = open_store(settings.storage)
    clients = Clients.connect(settings.coordinator, settings.client)
    k8s = settings.coordinator.kubernetes
    scaler = RendererScaler(k8s) if k8s.enabled else None
    return Coordinator(
        store, clients, settings.coordinator, scaler=scaler, leadership=build_leadership(settings, store)
    )


def build_leadership(settings: Settings, store: ObjectStore) -> Leadership | None:
    c = settings.coordinator
    if c.leader_election == "off":
        return None
    if c.leader_election == "kubernetes":
        lease: Lease = KubernetesLease(
            shared_api_client(c.kubernetes), c.kubernetes.namespace, c.leader_lease_name
        )
    else:
        lease = StorageLease(store)
    identity = c.identity or f"{socket.gethostname()}:{settings.server.port}"
    return Leadership(lease, identity, duration=c.leader_lease_seconds)


async def amain(settings: Settings) -> None:
    coordinator = build(settings)

    # Storage must answer: every job lives there.
    ready = StorageReadiness(coordinator.store, "jobs/")
    await coordinator.start()
    try:
        server = GrpcServer(
            [
                Registration.of(
                    pb,
                    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
                    CoordinatorServicer(coordinator),
                )
            ],
            settings.server,
            service_name=SERVICE,
            readiness=ready,
            shutdown_hooks=[coordinator.stop],
        )
        # Frames pending and in flight on the server's /metrics: what KEDA or an HPA scales the renderer on.
        coordinator.metrics.register(server.metrics.registry)
        await server.run_forever()
    finally:
        await coordinator.stop()
        await coordinator.clients.close()


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log)
    asyncio.run(amain(settings))


if __name__ == "__main__":
    main()
