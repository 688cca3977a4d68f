"""The one config mechanism: pydantic-settings, environment variables with prefix ``DREAMFRAME_``.

Nested sections use ``__``: ``DREAMFRAME_STORAGE__BACKEND=s3``, ``DREAMFRAME_SERVER__PORT=50051``,
``DREAMFRAME_RENDERER__BATCH_SIZE=4``. An optional YAML file named by ``DREAMFRAME_CONFIG_FILE`` gives
the same keys as nested mappings (``storage: {backend: s3}``); environment variables win over the file.
The Helm chart's ``config:`` values use exactly these names.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "DREAMFRAME_"
CONFIG_FILE_ENV = "DREAMFRAME_CONFIG_FILE"


class StorageSettings(BaseModel):
    """Where artifacts live."""

    backend: Literal["local", "s3"] = "local"
    # local backend: buckets are directories under root
    root: Path = Path(".dreamframe/store")
    bucket: str = "dreamframe"
    # s3 backend (MinIO or any S3): host:port, no scheme
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    secure: bool = False
    region: str | None = None
    create_bucket: bool = True


class ServerSettings(BaseModel):
    """How a service listens (the same for all seven)."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Prometheus /metrics over HTTP; 0 picks a free port, -1 disables.
    metrics_port: int = Field(0, ge=-1, le=65535)
    # SIGTERM: stop accepting, let in-flight RPCs finish for this long, then cancel them.
    grace_seconds: float = Field(30.0, ge=0)
    max_workers: int = Field(16, ge=1)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Bearer tokens accepted from callers; empty disables auth.
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Require client certificates signed by this CA (mutual TLS).
    tls_client_ca_file: Path | None = None

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # Allow DREAMFRAME_SERVER__AUTH_TOKENS=a,b as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json

                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value


class ClientSettings(BaseModel):
    """How services (and the CLI) call other services."""

    deadline_seconds: float = Field(60.0, gt=0)
    # Long streaming RPCs (rendering a story, training) get this deadline instead.
    stream_deadline_seconds: float = Field(24 * 3600.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=5)
    token: SecretStr = SecretStr("")
    tls_ca_file: Path | None = None
    tls: bool = False


class LogSettings(BaseModel):
    level: str = "INFO"
    # JSON lines (for clusters) or human-readable console output.
    json_format: bool = Field(False, alias="json")

    model_config = {"populate_by_name": True}


class ModelSettings(BaseModel):
    """Where model presets are cached (the tiny presets are built here once per machine)."""

    cache_dir: Path = Path(".dreamframe/models")


class PlotSettings(BaseModel):
    # "local" runs a transformers model with grammar-constrained decoding; "openai" calls an endpoint.
    backend: Literal["local", "openai"] = "local"
    # local: "tiny" or a model path/hub id
    model: str = "tiny"
    base_url: str | None = None
    api_key: SecretStr = SecretStr("")
    temperature: float = Field(0.8, ge=0, le=2)
    max_parallel_calls: int = Field(8, ge=1)
    max_repair_attempts: int = Field(3, ge=0)
    request_timeout_seconds: float = Field(120.0, gt=0)
    device: str = "auto"


class StyleSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    # Where real model weights are (a local path or hub id) per preset name.
    model_paths: dict[str, str] = Field(default_factory=dict)


class RendererSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    model_paths: dict[str, str] = Field(default_factory=dict)
    # 0 chooses from free GPU memory.
    batch_size: int = Field(0, ge=0)
    compile: bool = False


class QaSettings(BaseModel):
    fps: float = Field(2.0, gt=0)
    video_size: int = Field(336, ge=16)


class TrainerSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Local scratch for checkpoints before upload.
    work_dir: Path = Path(".dreamframe/trainer")
    max_concurrent_runs: int = Field(1, ge=1)


class EvaluatorSettings(BaseModel):
    device: str = "auto"
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key: SecretStr = SecretStr("")
    judge_max_attempts: int = Field(3, ge=1)


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
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)


class Settings(BaseSettings):
    """All of DreamFrame's configuration. Each service reads the sections it needs."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    plot: PlotSettings = Field(default_factory=PlotSettings)
    style: StyleSettings = Field(default_factory=StyleSettings)
    renderer: RendererSettings = Field(default_factory=RendererSettings)
    qa: QaSettings = Field(default_factory=QaSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    evaluator: EvaluatorSettings = Field(default_factory=EvaluatorSettings)
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file!r}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        sources.append(file_secret_settings)
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
