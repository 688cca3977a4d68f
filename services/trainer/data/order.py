"""Sample order: each epoch mixes the datasets by weight (each dataset's share is its weight over the
sum) and groups samples of similar length (transformers' length-grouped sampling) to cut padding. A
pure function of (plan, weights, seed, epoch, group size), so a resumed run sees the same order."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from .plan import DataPlan


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples each dataset contributes to one epoch of ``sum(sizes)`` samples: proportional to its
    weight (largest remainders), zero for an empty dataset."""
    live = [w if n > 0 else 0.0 for n, w in zip(sizes, weights, strict=True)]
    total, wsum = sum(sizes), sum(live)
    if total == 0 or wsum <= 0:
        return [0 for _ in sizes]
    exact = [total * w / wsum for w in live]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def epoch_order(
    plan: DataPlan, weights: Sequence[float], *, seed: int, epoch: int, group_size: int
) -> list[int]:
    """Indices into ``plan.samples`` for one epoch: the weighted mix (each dataset drawn without
    replacement, reshuffled each time it is used up), grouped by length in groups of ``group_size``
    (transformers' length-grouped order), padded by wrapping to a multiple of ``group_size``.
    A pure function of (plan, weights, seed, epoch, group_size)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    groups = plan.per_dataset()
    counts = mixture_counts([len(g) for g in groups], weights)
    drawn: list[int] = []
    for d, (members, count) in enumerate(zip(groups, counts, strict=True)):
        gen = torch.Generator().manual_seed(_seed(seed, epoch, d))
        while count > 0:
            perm = torch.randperm(len(members), generator=gen).tolist()
            take = perm[: min(count, len(members))]
            drawn.extend(members[j] for j in take)
            count -= len(take)
    gen = torch.Generator().manual_seed(_seed(seed, epoch, -1))
    lengths = [plan.samples[i].length for i in drawn]
    order = [drawn[j] for j in get_length_grouped_indices(lengths, group_size, generator=gen)]
    remainder = len(order) % group_size
    if remainder:
        order += order[: group_size - remainder]
    return order


def _seed(seed: int, epoch: int, stream: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
