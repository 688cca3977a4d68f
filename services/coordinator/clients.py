"""Stubs for every service the coordinator calls, built from its settings; the renderers are a
``discovery.RendererPool`` that follows the renderer replicas."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from dreamframe.config import ClientSettings
from dreamframe.serving.client import make_channel
from dreamframe.v1 import (
    eval_pb2_grpc,
    plot_pb2_grpc,
    qa_pb2_grpc,
    style_pb2_grpc,
    train_pb2_grpc,
)
from services.coordinator.settings import CoordinatorSettings

from .discovery import RendererPool, build_pool, connector, discovery_mode
from .fanout import Endpoint, split_targets
from .readiness import ServiceReadiness


@dataclass
class Clients:
    plot: plot_pb2_grpc.PlotServiceStub
    style: style_pb2_grpc.StyleServiceStub
    # A RendererPool (discovery); tests may pass a fixed list.
    renderers: RendererPool | list[Endpoint]
    qa: qa_pb2_grpc.QaServiceStub
    train: train_pb2_grpc.TrainServiceStub
    eval: eval_pb2_grpc.EvalServiceStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    # Waits for a service's health to say SERVING before a stage calls it (None: call at once).
    readiness: ServiceReadiness | None = None

    async def ready(self, service: str) -> None:
        """Wait until ``service`` (a name of ``addresses_of``) is ready to be called."""
        if self.readiness is not None:
            await self.readiness.wait(service)

    @classmethod
    def connect(cls, settings: CoordinatorSettings, client: ClientSettings, *, api_client=None) -> Clients:
        """Call from within the event loop: renderer discovery starts here. ``api_client``: the
        Kubernetes ApiClient to watch EndpointSlices with (default: the one the scaler shares)."""
        channels: list[grpc.aio.Channel] = []

        def channel(target: str) -> grpc.aio.Channel:
            ch = make_channel(target, client)
            channels.append(ch)
            return ch

        readiness = ServiceReadiness(
            connector(client),
            addresses_of(settings),
            timeout_s=settings.service_ready_timeout_s,
            poll_s=settings.service_ready_poll_s,
        )
        return cls(
            readiness=readiness,
            plot=plot_pb2_grpc.PlotServiceStub(channel(settings.plot_address)),
            style=style_pb2_grpc.StyleServiceStub(channel(settings.style_address)),
            renderers=build_pool(settings, connector(client), api_client=api_client),
            qa=qa_pb2_grpc.QaServiceStub(channel(settings.qa_address)),
            train=train_pb2_grpc.TrainServiceStub(channel(settings.trainer_address)),
            eval=eval_pb2_grpc.EvalServiceStub(channel(settings.evaluator_address)),
            channels=channels,
        )

    async def close(self) -> None:
        if isinstance(self.renderers, RendererPool):
            await self.renderers.close()
        for ch in self.channels:
            await ch.close()
        if self.readiness is not None:
            await self.readiness.close()


def addresses_of(settings: CoordinatorSettings) -> dict[str, list[str]]:
    """Where each service's health is asked. Renderers only as a static list: discovered replicas are
    listed by their readiness already (EndpointSlices, a headless Service's DNS)."""
    renderers = []
    if discovery_mode(settings) == "static":
        renderers = [t for t in split_targets(settings.renderer_addresses) if not t.startswith("dns:")]
    return {
        "plot-llm": [settings.plot_address],
        "style-trainer": [settings.style_address],
        "keyframe-renderer": renderers,
        "qa-generator": [settings.qa_address],
        "trainer": [settings.trainer_address],
        "evaluator": [settings.evaluator_address],
    }
