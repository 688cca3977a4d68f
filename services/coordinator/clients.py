"""Stubs for every service the coordinator calls, built from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from dreamframe.config import ClientSettings
from dreamframe.serving.client import make_channel
from dreamframe.v1 import (
    eval_pb2_grpc,
    plot_pb2_grpc,
    qa_pb2_grpc,
    render_pb2_grpc,
    style_pb2_grpc,
    train_pb2_grpc,
)
from services.coordinator.settings import CoordinatorSettings

from .fanout import Endpoint, split_targets


@dataclass
class Clients:
    plot: plot_pb2_grpc.PlotServiceStub
    style: style_pb2_grpc.StyleServiceStub
    renderers: list[Endpoint]
    qa: qa_pb2_grpc.QaServiceStub
    train: train_pb2_grpc.TrainServiceStub
    eval: eval_pb2_grpc.EvalServiceStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @classmethod
    def connect(cls, settings: CoordinatorSettings, client: ClientSettings) -> Clients:
        channels: list[grpc.aio.Channel] = []

        def channel(target: str) -> grpc.aio.Channel:
            ch = make_channel(target, client)
            channels.append(ch)
            return ch

        renderers = []
        for target in split_targets(settings.renderer_addresses):
            # A dns:/// name stands for every replica behind a headless Service: several workers share
            # its round-robin channel, so shards spread over the pods.
            workers = settings.render_parallelism if target.startswith("dns:") else 1
            renderers.append(Endpoint(target, render_pb2_grpc.RenderServiceStub(channel(target)), workers))
        return cls(
            plot=plot_pb2_grpc.PlotServiceStub(channel(settings.plot_address)),
            style=style_pb2_grpc.StyleServiceStub(channel(settings.style_address)),
            renderers=renderers,
            qa=qa_pb2_grpc.QaServiceStub(channel(settings.qa_address)),
            train=train_pb2_grpc.TrainServiceStub(channel(settings.trainer_address)),
            eval=eval_pb2_grpc.EvalServiceStub(channel(settings.evaluator_address)),
            channels=channels,
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
