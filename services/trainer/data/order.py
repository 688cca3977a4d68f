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


# --- the run's order: each rank its own block of every dataset -----------------------------------------
#
# Rank r of W owns block r of each dataset (records ⌊n·r/W⌋ … ⌊n·(r+1)/W⌋ - 1), so it reads only the index
# shards of its block, and the blocks together hold every record once. Each epoch the rank mixes its
# blocks by weight, shuffles, wraps to the same number of micro-batches as every other rank, and groups
# by length: megabatches of ``batch × G`` samples sorted by length and cut into micro-batches, placed in
# an order shared by all ranks (the k-th longest of each rank's megabatch at the same step, the longest
# one first so a too-long batch fails at once). A pure function of (sizes, weights, seed, epoch, rank,
# world, batch, this rank's lengths): a resumed run continues in exactly the same order.


def block(n: int, rank: int, world: int) -> range:
    """The records of a dataset of ``n`` that rank ``rank`` of ``world`` owns."""
    return range(n * rank // world, n * (rank + 1) // world)


def rank_counts(sizes: Sequence[int], weights: Sequence[float], rank: int, world: int) -> list[int]:
    """Samples rank ``rank`` draws from each dataset in one epoch (its blocks mixed by weight)."""
    return mixture_counts([len(block(n, rank, world)) for n in sizes], weights)


def micro_batches_per_epoch(sizes: Sequence[int], weights: Sequence[float], world: int, batch: int) -> int:
    """Micro-batches every rank takes per epoch: enough for the rank with the most samples."""
    most = max(sum(rank_counts(sizes, weights, r, world)) for r in range(world))
    return max(1, math.ceil(most / batch))


def rank_epoch_order(
    lengths: Sequence[Sequence[int]],
    sizes: Sequence[int],
    weights: Sequence[float],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    batch: int,
) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches for one epoch, each ``batch`` (dataset, position in the rank's block)
    pairs; ``lengths[d]`` are the (estimated) token lengths of the rank's block of dataset d."""
    counts = rank_counts(sizes, weights, rank, world)
    drawn: list[tuple[int, int]] = []
    for d, count in enumerate(counts):
        members = len(lengths[d])
        gen = torch.Generator().manual_seed(_seed(seed, epoch, d * world + rank))
        while count > 0 and members:
            take = torch.randperm(members, generator=gen).tolist()[: min(count, members)]
            drawn.extend((d, j) for j in take)
            count -= len(take)
    micro = micro_batches_per_epoch(sizes, weights, world, batch)
    gen = torch.Generator().manual_seed(_seed(seed, epoch, -1 - rank))
    drawn = [drawn[i] for i in torch.randperm(len(drawn), generator=gen).tolist()]
    if not drawn:
        raise ValueError(f"rank {rank} of {world} has no samples: fewer samples than processes")
    while len(drawn) < micro * batch:  # wrap: every rank takes the same number of micro-batches
        drawn += drawn[: micro * batch - len(drawn)]
    group = max(1, min(micro // 4, 50))
    out: list[list[tuple[int, int]]] = []
    for k, start in enumerate(range(0, micro, group)):
        g = min(group, micro - start)
        mega = drawn[start * batch : (start + g) * batch]
        mega.sort(key=lambda item: -lengths[item[0]][item[1]])
        pieces = [mega[i * batch : (i + 1) * batch] for i in range(g)]
        shared = torch.Generator().manual_seed(_seed(seed, epoch, -(1 << 20) - k))  # the same on every rank
        perm = torch.randperm(g, generator=shared).tolist()
        if k == 0:
            perm.remove(0)
            perm.insert(0, 0)
        out.extend(pieces[i] for i in perm)
    return out
