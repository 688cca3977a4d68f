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
    # The default model. local: "tiny" or a model path/hub id; openai: the endpoint's model name.
    model: str = "tiny"
    # Other models a request may name in options.model (anything else is INVALID_ARGUMENT).
    models: list[str] = Field(default_factory=list)
    base_url: str | None = None
    api_key: SecretStr = SecretStr("")
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    # Longest answer of one call, in tokens (a whole 11-substory outline fits comfortably).
    max_tokens: int = Field(8192, ge=64)
    max_parallel_calls: int = Field(8, ge=1)
    max_repair_attempts: int = Field(3, ge=0)
    request_timeout_seconds: float = Field(120.0, gt=0)
    # openai: retries of rate-limited / failed / timed-out requests, with exponential backoff.
    max_retries: int = Field(5, ge=0)
    # "strict": structural + semantic checks; "structural": only what the story format needs;
    # "auto": structural for the tiny random model, strict for every other model.
    validation: Literal["auto", "strict", "structural"] = "auto"
    # Longest free-text strings an answer may hold (titles/lines/QA, and overviews/contents).
    max_short_text_chars: int = Field(160, ge=8, le=1000)
    max_long_text_chars: int = Field(600, ge=8, le=4000)
    # Keep every finished call in storage so reruns ask nothing twice.
    cache: bool = True
    device: str = "auto"


class StyleSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    # Where real model weights are (a local path or hub id) per preset name.
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Load the default preset at startup (health says SERVING once it is loaded).
    preload: bool = True
    # Save a resumable checkpoint every N optimizer steps when the request leaves it at 0.
    checkpoint_every: int = Field(50, ge=0)
    # torch.compile the UNet for training (GPU): minutes once per process, ~2.5x faster passes after.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "reduce-overhead"
    )
    # Compile the two text encoders too (None: with compile).
    compile_text_encoders: bool | None = None
    # The UNet in channels-last memory format (None: on GPUs).
    channels_last: bool | None = False
    # Read training losses to the host once per this many steps (None: 10 on GPUs, 1 on CPUs).
    loss_read_every: int | None = Field(None, ge=1, le=1000)
    # Scaled-dot-product attention kernels ("auto": PyTorch's choice).
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"


class RendererSettings(BaseModel):
    preset: str = "tiny"
    device: str = "auto"
    model_paths: dict[str, str] = Field(default_factory=dict)
    # 0 chooses from free GPU memory (capped by max_batch_size; cpu_batch_size on a CPU). On an H100,
    # batch 16 (31 GiB peak) ran 2% faster per image than batch 8.
    batch_size: int = Field(0, ge=0)
    max_batch_size: int = Field(16, ge=1)
    cpu_batch_size: int = Field(4, ge=1)
    # torch.compile the UNets (also per request with options.compile); the mode is torch.compile's.
    # "default": on an H100, max-autotune spent over 10 minutes per UNet and still picked the cuBLAS/
    # cuDNN kernels for every matmul and convolution it timed; the gain is in fusing the rest.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    # When compiling, also compile the VAE decoder (one call per batch, at full resolution: eager it ran
    # at 103 TFLOP/s on an H100 while the UNets ran at ~350).
    compile_vae: bool = True
    # diffusers' inductor settings for SDXL on top of conv_1x1_as_mm (always on when compiling):
    # coordinate-descent tuning of the Triton kernels in all directions, no epilogue fusion. Longer
    # compiles; passed to our torch.compile calls only.
    compile_tuning: bool = False
    # Fused QKV projections (one matmul for q, k, v; one for k, v in cross-attention) in both UNets and
    # the VAE (diffusers' fuse_qkv_projections; the old projections become views of the fused weights).
    fuse_qkv: bool = True
    # The SDPA kernel preferred in the UNets while denoising. "auto": PyTorch's own choice; the others
    # go first in PyTorch's priority order, which falls back where that kernel can't run the shapes.
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    # channels-last memory format for UNets and VAE on GPUs (faster convolutions on tensor cores).
    channels_last: bool = True
    # FP8 matmuls (e4m3, per-row scales: dreamframe.models.fp8) for the UNets' attention-block linear
    # layers, on GPUs with FP8 tensor cores (compute capability ≥ 8.9); ignored elsewhere, with a warning.
    fp8: bool = False
    # Threads encoding and storing PNGs while the GPU renders the next batch (PNG encoding releases the
    # GIL); more shorten the wait for the last batch's writes.
    writer_threads: int = Field(4, ge=1)
    # Presets kept loaded at once (least recently used ones are dropped to make room).
    max_loaded_presets: int = Field(2, ge=1)
    # Load the default preset at startup, so readiness means "can render now".
    preload: bool = True


class QaSettings(BaseModel):
    # Defaults for requests that leave these at zero.
    fps: float = Field(2.0, gt=0)
    video_size: int = Field(336, ge=16, le=4096)
    num_choices: int = Field(4, ge=2, le=10)
    # Longer spans' QA is split into several conversations on the same video (context length).
    max_turns_per_conversation: int = Field(8, ge=1)
    # Subtitles beyond this many dialogue lines are cut (a whole story has ~700).
    max_subtitle_lines: int = Field(40, ge=1)
    # Dialogue-grounded questions added to each tiny story (0 disables them).
    dialogue_questions_per_tiny_story: int = Field(4, ge=0)
    # "auto": H.264 (libx264) when PyAV's FFmpeg has it, else MPEG-4 part 2.
    video_codec: Literal["auto", "libx264", "mpeg4"] = "auto"
    # libx264 constant rate factor (lower is better quality); mpeg4 maps it to a quantiser.
    video_crf: int = Field(23, ge=0, le=51)
    # Builds running at once (each encodes videos on the CPU); more wait their turn.
    max_concurrent_builds: int = Field(2, ge=1)


class TrainerSettings(BaseModel):
    # Base model of a run whose request names none ("tiny", "llava-1.5-7b", a path or hub id).
    preset: str = "tiny"
    device: str = "auto"
    # "auto": bf16 on GPUs (LoRA keeps the frozen base in bf16 too), fp32 on CPUs.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile each decoder layer of the language model (GPU runs; compiling costs the first steps).
    compile: bool = False
    # Preset name → local path or hub id (e.g. {"llava-1.5-7b": "/models/llava-1.5-7b-hf"}).
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Local scratch: each run's worker files, checkpoints before upload, the exported model.
    work_dir: Path = Path(".dreamframe/trainer")
    max_concurrent_runs: int = Field(1, ge=1)
    # Checkpoints kept in storage per run (the newest ones).
    keep_checkpoints: int = Field(2, ge=1)
    # Launches of a run's worker before a worker that keeps dying fails the run.
    max_attempts: int = Field(3, ge=1)
    # How long a cancelled or shut-down run may take to stop (and checkpoint) before it is killed.
    stop_grace_seconds: float = Field(120.0, ge=0)


class EvaluatorSettings(BaseModel):
    device: str = "auto"
    # Default LLM judge (open answers, free-form answer mapping); a request's `judge` overrides it.
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key: SecretStr = SecretStr("")
    # Malformed judgments are asked again up to this many times in all, then counted as failures.
    judge_max_attempts: int = Field(3, ge=1)
    judge_timeout_seconds: float = Field(120.0, gt=0)
    # Judge calls in flight at once (they are I/O bound; the model under test runs one item at a time).
    judge_parallel_calls: int = Field(8, ge=1)
    # Vision endpoints under test (ModelSpec.endpoint).
    endpoint_timeout_seconds: float = Field(300.0, gt=0)
    # Transport retries (connection errors, 429, 5xx) of the openai client, for endpoints and the judge.
    openai_max_retries: int = Field(2, ge=0)
    # Frames sampled per video when a ModelSpec leaves num_frames at 0.
    num_frames: int = Field(8, ge=1, le=256)
    max_new_tokens: int = Field(128, ge=1)
    # CLIP-style image encoder for style consistency: "tiny" or a path / hub id.
    image_encoder: str = "tiny"
    # Video-LLM preset name → local path or hub id, for ModelSpec.preset (as the trainer's).
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Local scratch: checkpoints downloaded from storage, decoded videos.
    work_dir: Path = Path(".dreamframe/evaluator")
    # Directories a benchmark's data_prefix/video_prefix may name as file:///<dir>/... (empty: none).
    local_data_roots: list[Path] = Field(default_factory=list)
    # Where model answers and judgments are cached in storage (shared by every report).
    cache_prefix: str = "cache/evaluator/"
    # Evaluations running at once (each holds a model in GPU memory); more wait their turn.
    max_concurrent_evaluations: int = Field(1, ge=1)


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


class CliSettings(BaseModel):
    """The ``dreamframe`` command line."""

    coordinator_address: str = "127.0.0.1:50060"
    # Local runs: process records, logs and the local store live here.
    state_dir: Path = Path(".dreamframe")
    # `dreamframe run` exports each job's results to <runs_dir>/<job>/.
    runs_dir: Path = Path("runs")


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
    cli: CliSettings = Field(default_factory=CliSettings)

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
