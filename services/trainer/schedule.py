"""The run's schedule: a pure function of the plan size and the batch geometry: steps per epoch, total
steps, how often to checkpoint. Step s of the run always trains on the same samples (``data.StepFeed``):
epoch ``s // steps_per_epoch`` has a fixed order per rank (seed, epoch), and within it step s takes the
next ``gradient_accumulation_steps`` micro-batches of ``per_device_batch_size`` samples on each rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spec import Hyperparameters


@dataclass(frozen=True)
class Schedule:
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    total_steps: int
    samples: int
    # Samples of one micro-batch over all ranks, micro-batches and optimizer steps of one epoch.
    group: int
    micro_per_epoch: int
    steps_per_epoch: int
    save_every: int

    @classmethod
    def of(
        cls, hp: Hyperparameters, world_size: int, samples: int, micro_per_epoch: int | None = None
    ) -> Schedule:
        """``micro_per_epoch``: micro-batches per rank and epoch (``data.micro_batches_per_epoch``);
        None: an even split of ``samples``."""
        group = hp.per_device_batch_size * world_size
        micro_per_epoch = micro_per_epoch or math.ceil(samples / group)
        steps_per_epoch = math.ceil(micro_per_epoch / hp.gradient_accumulation_steps)
        total_steps = hp.max_steps or hp.epochs * steps_per_epoch
        return cls(
            world_size=world_size,
            per_device_batch_size=hp.per_device_batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            total_steps=total_steps,
            samples=samples,
            group=group,
            micro_per_epoch=micro_per_epoch,
            steps_per_epoch=steps_per_epoch,
            save_every=hp.save_every_steps or max(1, math.ceil(total_steps / 10)),
        )

    def to_dict(self) -> dict:
        """What a checkpoint records: a run resumes only under the same schedule (same data order)."""
        return {
            "world_size": self.world_size,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "samples": self.samples,
        }
