"""Scaling the keyframe-renderer Deployment by pending frames, through the Kubernetes API.

Desired replicas = ceil(pending frames / frames_per_replica), clamped to [min_replicas, max_replicas].
The coordinator only needs ``get`` and ``patch`` on ``deployments/scale`` for one Deployment; the chart's
Role grants exactly that.
"""

from __future__ import annotations

import asyncio
import logging
import math

from dreamframe.errors import FailedPrecondition, Unavailable
from services.coordinator.settings import KubernetesSettings

log = logging.getLogger(__name__)


def desired_replicas(pending_frames: int, settings: KubernetesSettings) -> int:
    wanted = math.ceil(max(pending_frames, 0) / settings.frames_per_replica)
    return max(settings.min_replicas, min(settings.max_replicas, wanted))


def make_api_client(settings: KubernetesSettings):
    """An ApiClient from the pod's service account, the kubeconfig, or an explicit API host."""
    from kubernetes import client, config

    if settings.api_host:
        configuration = client.Configuration()
        configuration.host = settings.api_host
        return client.ApiClient(configuration)
    try:
        if settings.in_cluster:
            config.load_incluster_config()
        else:
            config.load_kube_config()
    except config.ConfigException as exc:
        raise FailedPrecondition(
            f"no Kubernetes configuration: {exc}", field="coordinator.kubernetes"
        ) from exc
    return client.ApiClient()


_shared_clients: dict[tuple[str | None, bool], object] = {}


def shared_api_client(settings: KubernetesSettings):
    """One ApiClient per API (host, in-cluster or kubeconfig) for the whole coordinator: the scaler and
    renderer discovery (discovery.py) share it."""
    key = (settings.api_host, settings.in_cluster)
    if key not in _shared_clients:
        _shared_clients[key] = make_api_client(settings)
    return _shared_clients[key]


class RendererScaler:
    def __init__(self, settings: KubernetesSettings, api_client=None) -> None:
        from kubernetes import client

        self.settings = settings
        self.apps = client.AppsV1Api(api_client or shared_api_client(settings))
        self.replicas = 0

    async def current(self) -> int:
        scale = await self._call(
            self.apps.read_namespaced_deployment_scale,
            self.settings.renderer_deployment,
            self.settings.namespace,
        )
        self.replicas = int(scale.spec.replicas or 0)
        return self.replicas

    async def scale_for(self, pending_frames: int) -> int:
        """Patch the Deployment's scale to what ``pending_frames`` needs; returns the replica count."""
        want = desired_replicas(pending_frames, self.settings)
        have = await self.current()
        if want != have:
            log.info(
                "scaling %s from %d to %d replicas (%d frames pending)",
                self.settings.renderer_deployment,
                have,
                want,
                pending_frames,
            )
            await self._call(
                self.apps.patch_namespaced_deployment_scale,
                self.settings.renderer_deployment,
                self.settings.namespace,
                {"spec": {"replicas": want}},
            )
            self.replicas = want
        return self.replicas

    async def _call(self, fn, *args):
        from kubernetes.client.exceptions import ApiException

        try:
            # The official client is synchronous; keep the event loop free.
            return await asyncio.to_thread(fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                raise FailedPrecondition(
                    f"Deployment {self.settings.namespace}/{self.settings.renderer_deployment} not found",
                    field="coordinator.kubernetes.renderer_deployment",
                ) from exc
            raise Unavailable(f"Kubernetes API error {exc.status}: {exc.reason}") from exc
        except OSError as exc:  # urllib3 connection errors
            raise Unavailable(f"Kubernetes API unreachable: {exc}") from exc
