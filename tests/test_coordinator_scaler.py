"""Renderer scaling through the Kubernetes API, against a local server that speaks it (kmock's
Kubernetes emulator over HTTP), driven by the official `kubernetes` client."""

from __future__ import annotations

import asyncio

import kmock
import pytest
from kubernetes import client

from dreamframe.errors import FailedPrecondition
from services.coordinator.scaler import RendererScaler, desired_replicas
from services.coordinator.settings import KubernetesSettings

NS = "dreamframe"
NAME = "dreamframe-keyframe-renderer"


def deployment(replicas: int) -> dict:
    labels = {"app.kubernetes.io/name": "keyframe-renderer"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "r", "image": "r:1"}]},
            },
        },
    }


def settings(url: str, **kw) -> KubernetesSettings:
    return KubernetesSettings(
        enabled=True,
        namespace=NS,
        renderer_deployment=NAME,
        api_host=url,
        min_replicas=kw.get("min_replicas", 1),
        max_replicas=kw.get("max_replicas", 4),
        frames_per_replica=100,
    )


def test_desired_replicas_is_clamped():
    s = KubernetesSettings(min_replicas=1, max_replicas=4, frames_per_replica=100)
    assert [desired_replicas(n, s) for n in (0, 1, 100, 101, 350, 10_000)] == [1, 1, 1, 2, 4, 4]
    assert desired_replicas(0, KubernetesSettings(min_replicas=0, max_replicas=3)) == 0


def test_scales_the_deployment_by_pending_frames():
    async def scenario():
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            url = str(server.url).rstrip("/")
            api = client.ApiClient(client.Configuration(host=url))
            await asyncio.to_thread(client.AppsV1Api(api).create_namespaced_deployment, NS, deployment(1))
            scaler = RendererScaler(settings(url), api)

            assert await scaler.current() == 1
            assert await scaler.scale_for(350) == 4  # 350 frames / 100 per replica, capped at 4
            # the server's object really changed, seen through a fresh read of the Deployment
            dep = await asyncio.to_thread(client.AppsV1Api(api).read_namespaced_deployment, NAME, NS)
            assert dep.spec.replicas == 4
            assert await scaler.scale_for(120) == 2
            assert await scaler.scale_for(0) == 1
            patches = k8s["patch"]
            assert len(patches) == 3
            assert all(patches[i].subresource == "scale" for i in range(3))
            # no patch when nothing changes
            await scaler.scale_for(50)
            assert len(k8s["patch"]) == 3

    asyncio.run(scenario())


def test_missing_deployment_is_a_clear_error():
    async def scenario():
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            url = str(server.url).rstrip("/")
            scaler = RendererScaler(settings(url), client.ApiClient(client.Configuration(host=url)))
            with pytest.raises(FailedPrecondition) as info:
                await scaler.scale_for(10)
            assert info.value.field == "coordinator.kubernetes.renderer_deployment"

    asyncio.run(scenario())


def test_the_coordinator_scales_by_the_frames_its_jobs_have_pending(tmp_path):
    from dreamframe.storage import LocalStore
    from services.coordinator.clients import Clients
    from services.coordinator.runner import Coordinator
    from services.coordinator.settings import CoordinatorSettings

    async def scenario():
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            url = str(server.url).rstrip("/")
            api = client.ApiClient(client.Configuration(host=url))
            apps = client.AppsV1Api(api)
            await asyncio.to_thread(apps.create_namespaced_deployment, NS, deployment(1))
            scaler = RendererScaler(settings(url), api)
            clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
            coordinator = Coordinator(
                LocalStore(tmp_path, "bucket"),
                clients,
                CoordinatorSettings(),
                scaler=scaler,
                scale_interval_seconds=0.05,
            )
            await coordinator.start()

            async def replicas_become(n: int) -> None:
                for _ in range(200):
                    dep = await asyncio.to_thread(apps.read_namespaced_deployment, NAME, NS)
                    if dep.spec.replicas == n:
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"replicas never became {n}")

            # Two renders' frames, as the fan-out counts them (the metrics KEDA or an HPA would read).
            coordinator.metrics.add(pending=250)
            coordinator.metrics.add(pending=100)
            await replicas_become(4)
            # What job status reports: the scaler records the count once its PATCH call has returned,
            # a moment after the API server shows it.
            for _ in range(100):
                if coordinator._replicas() == 4:
                    break
                await asyncio.sleep(0.02)
            assert coordinator._replicas() == 4
            coordinator.metrics.add(pending=-350)
            await replicas_become(1)
            await coordinator.stop()

    asyncio.run(scenario())
