"""The coordinator service's own settings: the ``coordinator`` section
(``DREAMFRAME_COORDINATOR__*``, ``coordinator:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

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
    # A `dns:///headless-service:port` target (round robin over replicas) or a comma-separated list.
    renderer_addresses: str = "127.0.0.1:50063"
    qa_address: str = "127.0.0.1:50064"
    trainer_address: str = "127.0.0.1:50065"
    evaluator_address: str = "127.0.0.1:50066"
    max_concurrent_jobs: int = Field(4, ge=1)
    # Frames per render shard sent to one replica.
    render_shard_size: int = Field(16, ge=1)
    # Concurrent shards in flight over a dns:/// renderer target (about one per replica).
    render_parallelism: int = Field(2, ge=1)
    # Stories of one job worked on at once (plot, style, render per story).
    story_parallelism: int = Field(4, ge=1)
    # The model a job's training starts from when its spec names none (a trainer preset or path).
    train_base_model: str = "tiny"
    # How often job progress is written to storage while a stage runs (transitions always are).
    persist_interval_seconds: float = Field(2.0, ge=0)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
