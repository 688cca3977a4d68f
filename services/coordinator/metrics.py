"""The coordinator's Prometheus metrics: the render work it holds, which is what the renderer scales on.

- ``dreamframe_render_frames_pending`` (gauge): frames of running renders not rendered yet, whether
  waiting for a renderer or being rendered. The autoscalers' signal: desired renderer replicas =
  ceil(pending / frames per replica), as KEDA's threshold, the HPA's AverageValue target and the built-in
  scaler's ``frames_per_replica`` all compute it.
- ``dreamframe_render_frames_inflight`` (gauge): the part of them sent to a renderer and not reported yet.
- ``dreamframe_render_frames_delivered_total`` (counter, ``outcome`` rendered|skipped) and
  ``dreamframe_render_shards_resent_total`` (counter): throughput and replicas lost mid-shard.

The fan-out moves them as it queues, sends and receives frames: O(1) per frame, never a sum over stories
or jobs. They live on the coordinator and are added to its gRPC server's registry (``register``), so
they are served on the same ``/metrics`` port as the server's own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RenderMeter:
    """What the fan-out reports as frames move; this base reports nowhere."""

    def add(self, *, pending: int = 0, inflight: int = 0) -> None:
        """Frames entering (+) or leaving (-) the pending and in-flight counts."""

    def delivered(self, *, rendered: int = 0, skipped: int = 0) -> None:
        """Frames reported for the first time (rendered now, or found already stored)."""

    def resent(self) -> None:
        """A shard went back on the queue because its replica could not finish it."""


class CoordinatorMetrics(RenderMeter):
    """The coordinator's metrics (created unregistered; ``register`` adds them to a registry)."""

    def __init__(self) -> None:
        r = None  # unregistered until register(): several coordinators in one process never collide
        self.pending = 0
        self.inflight = 0
        self.pending_gauge = Gauge(
            "dreamframe_render_frames_pending",
            "Frames of running renders not rendered yet (waiting or being rendered).",
            registry=r,
        )
        self.inflight_gauge = Gauge(
            "dreamframe_render_frames_inflight",
            "Frames sent to a renderer replica and not reported yet.",
            registry=r,
        )
        self.frames = Counter(
            "dreamframe_render_frames_delivered",
            "Frames reported by the renderers, counted once each, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.shards_resent = Counter(
            "dreamframe_render_shards_resent",
            "Shards put back on the queue after a replica failed or stopped mid-shard.",
            registry=r,
        )

    def register(self, registry: CollectorRegistry) -> None:
        for collector in (self.pending_gauge, self.inflight_gauge, self.frames, self.shards_resent):
            registry.register(collector)

    def add(self, *, pending: int = 0, inflight: int = 0) -> None:
        if pending:
            self.pending += pending
            self.pending_gauge.set(self.pending)
        if inflight:
            self.inflight += inflight
            self.inflight_gauge.set(self.inflight)

    def delivered(self, *, rendered: int = 0, skipped: int = 0) -> None:
        if rendered:
            self.frames.labels("rendered").inc(rendered)
        if skipped:
            self.frames.labels("skipped").inc(skipped)

    def resent(self) -> None:
        self.shards_resent.inc()
