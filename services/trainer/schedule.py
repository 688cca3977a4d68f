"""The run's schedule and which samples each step trains on.

``Schedule`` is a pure function of the plan size and the batch geometry: steps per epoch, total steps,
how often to checkpoint. Step s of the run always trains on the same samples (``StepBatches``): epoch
``s // steps_per_epoch`` has a fixed order (seed, epoch), and within it step s takes the next
``gradient_accumulation_steps`` micro-batches of ``per_device_batch_size × world_size`` samples, of which
rank r takes its own ``per_device_batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .data import Batch, DataPlan, Sample, epoch_order
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
    def of(cls, hp: Hyperparameters, world_size: int, samples: int) -> Schedule:
        group = hp.per_device_batch_size * world_size
        micro_per_epoch = math.ceil(samples / group)
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


class StepBatches:
    """This rank's micro-batches for optimizer step ``step`` (0-based): ``batches(step)``."""

    def __init__(
        self,
        plan: DataPlan,
        collate: Callable[[Sequence[Sample]], Batch],
        schedule: Schedule,
        *,
        seed: int,
        rank: int,
    ) -> None:
        self.plan = plan
        self.collate = collate
        self.schedule = schedule
        self.seed = seed
        self.rank = rank
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            weights = [d["weight"] for d in self.plan.datasets]
            self._orders = {
                epoch: epoch_order(
                    self.plan, weights, seed=self.seed, epoch=epoch, group_size=self.schedule.group
                )
            }
        return self._orders[epoch]

    def __call__(self, step: int) -> list[Batch]:
        s = self.schedule
        epoch, k = divmod(step, s.steps_per_epoch)
        accum = s.gradient_accumulation_steps
        order = self.order(epoch)
        b, r = s.per_device_batch_size, self.rank
        out = []
        for m in range(k * accum, min((k + 1) * accum, s.micro_per_epoch)):
            indices = order[m * s.group + r * b : m * s.group + (r + 1) * b]
            out.append(self.collate([self.plan.samples[i] for i in indices]))
        return out
