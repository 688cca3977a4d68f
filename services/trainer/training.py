"""One training run, on every process of it: ``run_training(spec, store, runtime, hooks)``.

The same code runs in a world of one (in-process, tests, one GPU) and under torchrun (FSDP over the
pod's GPUs). Rank 0 does the storage I/O and reports progress; every decision that changes control flow
(stop requests, bad data, divergence) is agreed through a collective, so ranks never part ways.

A run is composed of:

- ``run_setup.prepare_run``: model path, processor, token budget, data plan, collator, schedule, model,
  optimizer and learning-rate scheduler;
- ``loop.TrainingLoop``: resume, the optimizer steps (``step``) over each step's samples (``schedule``),
  checkpoints (``checkpoint.save_run`` / ``restore_run``), progress, stop requests, ``metrics``, and the
  final ``export``.

Step s of the run always trains on the same samples, and a resumed run restores model, optimizer,
scheduler and RNG states from the last checkpoint and continues at the step after it, so it ends with
the same number of optimizer steps, the same data order and (on deterministic hardware) the same
weights.
"""

from __future__ import annotations

from pathlib import Path

from dreamframe.logging import get_logger
from dreamframe.storage.base import ObjectStore

from .contract import Hooks, Outcome, RunProgress, Runtime, Stop, TrainingDiverged
from .distributed import init_distributed, teardown
from .loop import TrainingLoop
from .run_setup import plan_key, prepare_run
from .spec import RunSpec

__all__ = [
    "Hooks",
    "Outcome",
    "RunProgress",
    "Runtime",
    "Stop",
    "TrainingDiverged",
    "plan_key",
    "run_training",
]

log = get_logger(__name__)


def run_training(spec: RunSpec, store: ObjectStore, runtime: Runtime, hooks: Hooks | None = None) -> Outcome:
    """Train ``spec`` to the end (or until stopped), resuming from its last checkpoint if it has one."""
    run_dir = Path(runtime.work_dir) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed(runtime.device, run_dir)
    try:
        run = prepare_run(spec, store, runtime, ctx, run_dir, log.bind(run_id=spec.run_id, rank=ctx.rank))
        return TrainingLoop(run, hooks or Hooks()).train()
    finally:
        teardown(ctx)
