"""The coordinator service's own settings: the ``coordinator`` section
(``DREAMFRAME_COORDINATOR__*``, ``coordinator:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class KubernetesSettings(BaseModel):
    enabled: bool = False
    namespace: str = "default"
    renderer_deployment: str = "dreamframe-keyframe-renderer"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=1)
    # One replica per this many pending frames.
    frames_per_replica: int = Field(200, ge=1)
    # Use the in-cluster service account; else the kubeconfig (and optional explicit API host).
    in_cluster: bool = True
    api_host: str | None = None


class CoordinatorSettings(BaseModel):
    plot_address: str = "127.0.0.1:50061"
    style_address: str = "127.0.0.1:50062"
    # A `dns:///headless-service:port` target (re-resolved every discovery_interval_seconds, one channel
    # per address) or a comma-separated list of replica addresses.
    renderer_addresses: str = "127.0.0.1:50063"
    # How renderer replicas are found (discovery.py): `kubernetes` watches the EndpointSlices of
    # `renderer_service` (namespace: kubernetes.namespace) through the API; `dns` re-resolves the
    # dns:/// name of renderer_addresses; `static` uses renderer_addresses as given (a dns:/// target
    # there is one round-robin channel with render_parallelism shards in flight). `auto`: kubernetes when
    # renderer_service is set and a Kubernetes API is at hand, else dns for a dns:/// target, else static.
    renderer_discovery: Literal["auto", "kubernetes", "dns", "static"] = "auto"
    renderer_service: str = ""
    # The EndpointSlice port to call (by name; a slice with one port: that one).
    renderer_port_name: str = "grpc"
    # DNS re-resolution period; also the pause before the Kubernetes watch reconnects after an error.
    discovery_interval_seconds: float = Field(5.0, gt=0)
    # Shards in flight per ready replica (2: the next shard is there when a replica finishes one).
    renderer_inflight_per_replica: int = Field(2, ge=1)
    # A replica that leaves (not ready, terminating, gone from DNS) gets no new shard; the shard it is
    # working on may finish for this long, then its channel is closed and its unreported frames re-sent.
    renderer_drain_seconds: float = Field(120.0, ge=0)
    # A render with no replica at all waits this long for one (scale-up from zero) before failing.
    renderer_wait_seconds: float = Field(1800.0, ge=0)
    # Before each stage's call the coordinator waits for that service's gRPC health to say SERVING (it
    # says NOT_SERVING while it loads its models, and while the renderer compiles its first batch):
    # this long at most, then the stage fails naming the service. Separate from the calls' deadlines,
    # which then count only the work; 0: call at once. (A static renderer list: any replica SERVING.)
    service_ready_timeout_s: float = Field(1800.0, ge=0)
    # How often health is asked while waiting.
    service_ready_poll_s: float = Field(0.5, gt=0)
    qa_address: str = "127.0.0.1:50064"
    trainer_address: str = "127.0.0.1:50065"
    evaluator_address: str = "127.0.0.1:50066"
    max_concurrent_jobs: int = Field(4, ge=1)
    # Frames per render shard sent to one replica (one RenderFrames call). 64 = 4 batches of 16: each call
    # has a fixed CPU cost in the coordinator, and a replica that fails mid-shard loses only what it had
    # not reported yet (reported frames are kept), so larger shards cost nothing in re-rendering.
    render_shard_size: int = Field(64, ge=1)
    # Concurrent shards over a dns:/// renderer target with renderer_discovery `static` only (one
    # round-robin channel); discovered replicas get renderer_inflight_per_replica each.
    render_parallelism: int = Field(2, ge=1)
    # Stories of one job worked on at once (plot, style, render per story).
    story_parallelism: int = Field(4, ge=1)
    # The model a job's training starts from when its spec names none (a trainer preset or path).
    train_base_model: str = "tiny"
    # How often job progress is written to storage while a stage runs (transitions always are).
    persist_interval_seconds: float = Field(2.0, ge=0)
    # One active coordinator among replicas (leader.py): "storage" (a lease object in storage, written
    # with compare-and-swap), "kubernetes" (a coordination.k8s.io Lease named leader_lease_name in
    # kubernetes.namespace), "off" (this replica always leads: only for a single coordinator).
    leader_election: Literal["storage", "kubernetes", "off"] = "storage"
    leader_lease_name: str = "dreamframe-coordinator"
    # Another replica takes over this long after the leader's last renewal (it renews every third of it).
    leader_lease_seconds: float = Field(15.0, ge=1)
    # This replica's name in the lease (default: host name and server port; a restarted process with
    # the same name takes its lease back at once).
    identity: str = ""
    # Storyboard pages and contact sheets per story (one thumbnail read and decode per frame: about
    # 0.4 ms of CPU per frame).
    storyboard: bool = True
    # Ask a renderer replica to build each story's board (BuildStoryBoard: its CPUs sit idle while its
    # GPU renders); the coordinator builds it itself only when no replica can (none ready, an older
    # renderer without the call, an error).
    storyboard_on_renderers: bool = True
    # How long one replica's BuildStoryBoard may take before the coordinator builds the board itself.
    storyboard_timeout_seconds: float = Field(600.0, gt=0)
    # WatchJob sends at most one update per this many seconds per watcher (the latest state then).
    watch_interval_seconds: float = Field(0.25, ge=0)
    # How often the leader looks for jobs submitted through other replicas and for cancel requests.
    pickup_interval_seconds: float = Field(2.0, gt=0)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
