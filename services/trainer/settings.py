"""The trainer service's own settings: the ``trainer`` section
(``DREAMFRAME_TRAINER__*``, ``trainer:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, Field

from dreamframe.models.compile_cache import CompileCacheSettings


class TrainerSettings(BaseModel):
    # Base model of a run whose request names none ("tiny", "llava-1.5-7b", a path or hub id).
    preset: str = "tiny"
    device: str = "auto"
    # "auto": bf16 on GPUs (LoRA keeps the frozen base in bf16 too), fp32 on CPUs.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile each decoder layer of the language model (GPU runs; compiling costs the first steps).
    compile: bool = False
    # Compiled layers kept and reused across runs and pods (dreamframe.models.compile_cache; the worker
    # processes read it from these settings): a run loads them instead of compiling.
    compile_cache: CompileCacheSettings = Field(default_factory=CompileCacheSettings)
    # Preset name → local path or hub id (e.g. {"llava-1.5-7b": "/models/llava-1.5-7b-hf"}).
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Local scratch: each run's worker files, checkpoints before upload, the exported model.
    work_dir: Path = Path(".dreamframe/trainer")
    # A run forecasts the disk its checkpoints and final export need in work_dir (with a local store on
    # the same disk, the checkpoints it keeps too) and fails at start with RESOURCE_EXHAUSTED when they
    # cannot fit, rather than with a full disk after training.
    check_free_disk: bool = True
    # The size limit of the volume work_dir is on, when its filesystem does not show it: a Kubernetes
    # emptyDir's sizeLimit (the kubelet evicts the pod past it; statvfs shows the node's disk). The chart
    # sets it from scratch.sizeLimit. "200GiB", "200GB" or bytes; empty: the filesystem's free space.
    work_dir_size_limit: ByteSize | None = None
    max_concurrent_runs: int = Field(1, ge=1)
    # A one-process run whose step runs out of GPU memory (a 7B step at batch 4 on a shared card's
    # budget) retries it with activation checkpointing on instead of failing; metrics.json says so.
    checkpointing_on_oom: bool = True
    # Checkpoints kept in storage per run (the newest ones).
    keep_checkpoints: int = Field(2, ge=1)
    # Keep a succeeded run's resume checkpoints (trained weights + optimizer state: 3.8 GB each for a
    # 7B LoRA at rank 128) after its final model and adapter are stored. Off: they are deleted, since
    # nothing resumes a finished run and a thousand-job campaign would otherwise keep terabytes of them.
    keep_checkpoints_after_success: bool = False
    # Launches of a run's worker before a worker that keeps dying fails the run.
    max_attempts: int = Field(3, ge=1)
    # How long a cancelled or shut-down run may take to stop (and checkpoint) before it is killed.
    stop_grace_seconds: float = Field(120.0, ge=0)
    # Data-loader worker processes per training process (read, decode, tokenize); -1: the CPUs shared by
    # the node's training processes, less one each, at most 16.
    loader_workers: int = Field(-1, ge=-1)
    # Micro-batches each loader worker prepares ahead of the training loop.
    loader_prefetch: int = Field(4, ge=1)
