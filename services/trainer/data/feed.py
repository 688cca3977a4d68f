"""Feeding one rank: its share of the data (``RankShare``: its block of every dataset, read from the
index shards or sliced from a record-by-record plan) and the step feed (``StepFeed``): a torch DataLoader
whose worker processes read media (streamed from storage), decode videos and tokenize, ``prefetch_factor``
micro-batches each ahead of the training loop, in the order ``rank_epoch_order`` fixes.

``StepFeed(start_step=s)`` yields the micro-batches of optimizer steps s, s+1, … exactly as a run from
step 0 would at those steps, so a run resumed mid-epoch continues in the same order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from .collate import Batch, Collator
from .index import entry_fields, read_entries
from .order import block, rank_counts, rank_epoch_order
from .plan import DataPlan, Sample
from .records import VIDEO, image_count

# Text characters per token for the length estimate of indexed samples (English BPE: about 4; lower
# overestimates, which only moves a sample to a group of longer ones).
CHARS_PER_TOKEN = 3.5
# Chat-template tokens a sample has besides its text and frames (role markers, separators).
TEMPLATE_TOKENS = 16


def estimated_length(chars: int, n_images: int, per_image: int) -> int:
    return n_images * per_image + math.ceil(chars / CHARS_PER_TOKEN) + TEMPLATE_TOKENS


@dataclass
class RankShare:
    """One rank's block of every dataset: ``samples[d][j]`` and, for indexed datasets, the index line
    each sample's record comes from (``lines[d][j]``; None when the record is in memory)."""

    samples: list[list[Sample]]
    lines: list[list[bytes | None]]

    def lengths(self) -> list[list[int]]:
        return [[s.length for s in group] for group in self.samples]


def rank_share(
    store: ObjectStore, plan: DataPlan, processor, *, rank: int, world: int, num_frames: int
) -> RankShare:
    """This rank's block of each dataset: index shards streamed for an indexed dataset (only those that
    hold the block), a slice of the planned samples for the others."""
    per_image = video_llm.image_token_count(processor)
    grouped = plan.per_dataset()
    sizes = plan.sizes()
    samples: list[list[Sample]] = []
    lines: list[list[bytes | None]] = []
    for d, dataset in enumerate(plan.datasets):
        span = block(sizes[d], rank, world)
        index = dataset.get("index")
        if not index:
            samples.append([plan.samples[grouped[d][j]] for j in span])
            lines.append([None] * len(span))
            continue
        got_samples: list[Sample] = []
        got_lines: list[bytes | None] = []
        for n, line in read_entries(store, index, span.start, span.stop, index["bucket"]):
            try:
                rid, kind, keys, media_sizes, chars = entry_fields(line)
            except ValueError:
                # Counted when it is met: its Sample has no media, so collating it reports the problem.
                rid, kind, keys, media_sizes, chars = f"#{n}", VIDEO, (), (), len(line)
            length = estimated_length(chars, image_count(kind, keys, num_frames), per_image)
            got_samples.append(Sample(d, n, rid, kind, keys, length, media_sizes))
            got_lines.append(line)
        samples.append(got_samples)
        lines.append(got_lines)
    return RankShare(samples, lines)


def rank_sample_counts(plan: DataPlan, world: int) -> list[int]:
    """Samples each rank draws per epoch (a rank with none cannot train: too few samples)."""
    weights = [d["weight"] for d in plan.datasets]
    return [sum(rank_counts(plan.sizes(), weights, r, world)) for r in range(world)]


class _Encode(Dataset):
    """What a loader worker does for one sample: read, decode, tokenize (``Collator.encode``)."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __getitem__(self, item: tuple[Sample, bytes | None]) -> tuple[Sample, dict, str]:
        sample, line = item
        return (sample, *self.collator.encode(sample, line))

    def __len__(self) -> int:  # only a batch sampler indexes it
        return 0


class _MicroBatches:
    """The batch sampler: this rank's micro-batches from optimizer step ``start`` to ``stop``."""

    def __init__(self, feed: StepFeed) -> None:
        self.feed = feed

    def __iter__(self) -> Iterator[list[tuple[Sample, bytes | None]]]:
        feed = self.feed
        for step in range(feed.start_step, feed.stop_step):
            for micro in feed.micro_of_step(step):
                yield [(feed.share.samples[d][j], feed.share.lines[d][j]) for d, j in micro]

    def __len__(self) -> int:
        return sum(len(self.feed.micro_of_step(s)) for s in range(self.feed.start_step, self.feed.stop_step))


def _worker_init(store: ObjectStore):
    def init(_worker_id: int) -> None:
        # A forked worker must not share the parent's pooled storage connections: drop its copies.
        store.close()

    return init


class StepFeed:
    """This rank's micro-batches step by step: ``for batches in feed`` gives the list of Batches of each
    optimizer step from ``start_step`` on. ``workers`` 0 reads in this process (no prefetch)."""

    def __init__(
        self,
        share: RankShare,
        collator: Collator,
        *,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int,
        rank: int,
        world: int,
        batch: int,
        accumulation: int,
        micro_per_epoch: int,
        steps_per_epoch: int,
        start_step: int,
        stop_step: int,
        workers: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        self.share = share
        self.collator = collator
        self.sizes, self.weights = list(sizes), list(weights)
        self.seed, self.rank, self.world, self.batch = seed, rank, world, batch
        self.accumulation = accumulation
        self.micro_per_epoch = micro_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.start_step, self.stop_step = start_step, stop_step
        self.workers = workers
        self.prefetch_factor = prefetch_factor
        self._orders: dict[int, list[list[tuple[int, int]]]] = {}
        self._loader: DataLoader | None = None

    def order(self, epoch: int) -> list[list[tuple[int, int]]]:
        if epoch not in self._orders:
            self._orders = {
                epoch: rank_epoch_order(
                    self.share.lengths(),
                    self.sizes,
                    self.weights,
                    seed=self.seed,
                    epoch=epoch,
                    rank=self.rank,
                    world=self.world,
                    batch=self.batch,
                )
            }
        return self._orders[epoch]

    def micro_of_step(self, step: int) -> list[list[tuple[int, int]]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        return order[k * self.accumulation : min((k + 1) * self.accumulation, self.micro_per_epoch)]

    def samples_of_step(self, step: int) -> list[list[Sample]]:
        """The samples of each micro-batch of ``step`` (no reading: what the step will train on)."""
        return [[self.share.samples[d][j] for d, j in micro] for micro in self.micro_of_step(step)]

    def __iter__(self) -> Iterator[list[Batch]]:
        # Micro-batch counts per step, known up front: the sampler itself runs ahead in the loader.
        counts = [len(self.micro_of_step(s)) for s in range(self.start_step, self.stop_step)]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker tokenizes one sample at a time
        extra = (
            {
                "prefetch_factor": self.prefetch_factor,
                "worker_init_fn": _worker_init(self.collator.store),
                "multiprocessing_context": "fork",
            }
            if self.workers > 0
            else {}
        )
        self._loader = DataLoader(
            _Encode(self.collator),
            batch_sampler=_MicroBatches(self),
            num_workers=self.workers,
            collate_fn=self.collator.pad,
            # Its own generator: the loader draws a seed when it starts, and drawing it from the global
            # RNG would shift dropout after a resume (the global state is restored from the checkpoint).
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )
        micro = iter(self._loader)
        try:
            for count in counts:
                yield [next(micro) for _ in range(count)]
        finally:
            del micro  # shuts the workers down
            self._loader = None


def loader_workers(setting: int, local_world_size: int) -> int:
    """Loader worker processes per rank: as set, or (-1) the CPUs this process may use shared by the
    node's ranks, less one for the rank itself, at most 16."""
    if setting >= 0:
        return setting
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(16, cpus // max(1, local_world_size) - 1))
