"""What a training run is given and what it gives back: the trainer's ``Runtime`` settings, the
``Hooks`` through which rank 0 reports ``RunProgress`` and hears ``Stop`` requests, and the run's
``Outcome`` (or ``TrainingDiverged``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path

from dreamframe.errors import FailedPrecondition
from dreamframe.storage.base import ObjectRef


class Stop(IntEnum):
    NONE = 0
    CANCEL = 1
    # Service shutdown: checkpoint now and leave the run to be resumed.
    SHUTDOWN = 2


class TrainingDiverged(FailedPrecondition):
    """The loss or the gradient norm stopped being finite."""


@dataclass
class Runtime:
    """Process-level settings of the trainer (the same for every run)."""

    work_dir: Path
    model_cache_dir: Path = Path(".dreamframe/models")
    model_paths: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    keep_checkpoints: int = 2
    # Keep the resume checkpoints once the final model is stored (default: deleted; see settings).
    keep_checkpoints_after_success: bool = False
    # Pad sequences to a multiple of this (0: 8 on GPUs, for tensor cores; 1 on CPUs).
    pad_to_multiple_of: int = 0
    # torch.compile each decoder layer (GPU runs; the first steps pay the compilation).
    compile: bool = False
    # Data-loader worker processes per rank (-1: by the CPUs, ``data.loader_workers``) and the
    # micro-batches each prepares ahead (the worker process fills these from the trainer settings).
    loader_workers: int = -1
    loader_prefetch: int = 4
    # A step that runs out of GPU memory is retried with activation checkpointing on (one process).
    checkpointing_on_oom: bool = True
    # Forecast the disk the run's checkpoints and export need in work_dir and fail at start if they
    # cannot fit (``disk``); the size limit of work_dir's volume when the filesystem does not show it.
    check_free_disk: bool = True
    work_dir_size_limit: int | None = None


@dataclass
class RunProgress:
    """The run after its latest optimizer step: what ``progress.json`` and a checkpoint's state carry
    (the ETA comes from ``dreamframe.progress.ProgressClock``)."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = -1.0
    samples_seen: int = 0
    bad_samples: int = 0
    tokens_seen: int = 0
    checkpoint: ObjectRef | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _noop(*_args) -> None:
    return None


@dataclass
class Hooks:
    """Rank 0's connection to whoever runs the training (the worker process, a test)."""

    on_progress: Callable[[RunProgress], None] = _noop
    should_stop: Callable[[], Stop] = lambda: Stop.NONE


@dataclass
class Outcome:
    status: str  # "succeeded" | "cancelled" | "interrupted"
    progress: RunProgress
    final_model: ObjectRef | None = None
    final_model_prefix: str = ""
    metrics: ObjectRef | None = None
    # The run's resume checkpoints were deleted once the final model was stored.
    checkpoints_dropped: bool = False
