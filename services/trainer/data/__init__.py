"""The data pipeline: LLaVA conversation JSON in storage → a data plan → per-epoch sample order → batches.

- ``sources``: reading a dataset (a conversation list, or a qa-generator manifest pointing at one).
- ``records``: one record's conversation and visual input, checked.
- ``media``: which storage key a record's media path means, and reading its frames.
- ``tokens``: the per-sample token budget and exact token lengths.
- ``index``: a qa-generator manifest's sharded record index (ids, media keys and sizes, text lengths,
  the records), read shard by shard.
- ``plan``: ``build_plan`` plans an indexed dataset from its manifest alone (counts and shards); any
  other dataset is checked record by record (structure, media exist, exact token length) with bad
  samples reported and counted, more than the allowed fraction failing the run before training. The
  plan is stored with the run, so a resumed run trains on exactly the same samples in the same order.
- ``order``: each rank's block of every dataset, mixed by weight and grouped by length
  (``rank_epoch_order``); ``epoch_order`` is the same mix over all samples at once.
- ``feed``: one rank's share (``rank_share``) and its ``StepFeed``: loader worker processes that read,
  decode and tokenize ahead of the training loop, resumable at any step.
- ``collate``: ``Collator`` turns samples into a padded ``Batch`` with answer-only labels, checking each
  sample exactly (bad ones become counted, masked placeholders).

The names below are the pipeline's public interface; import them from here.
"""

from __future__ import annotations

from .collate import Batch, Collator
from .feed import RankShare, StepFeed, loader_workers, rank_sample_counts, rank_share
from .media import MediaResolver, candidate_keys, read_frames
from .order import block, epoch_order, micro_batches_per_epoch, mixture_counts, rank_epoch_order
from .plan import MAX_REPORTED_BAD, BadSample, DataPlan, Sample, build_plan, check_bad_fraction
from .records import FRAMES, IMAGE, VIDEO, Conversation, image_count, media_of, parse_conversation
from .sources import LoadedDataset, load_dataset
from .tokens import resolve_max_length, token_lengths

__all__ = [
    "FRAMES",
    "IMAGE",
    "MAX_REPORTED_BAD",
    "VIDEO",
    "BadSample",
    "Batch",
    "Collator",
    "Conversation",
    "DataPlan",
    "LoadedDataset",
    "MediaResolver",
    "RankShare",
    "Sample",
    "StepFeed",
    "block",
    "build_plan",
    "candidate_keys",
    "check_bad_fraction",
    "epoch_order",
    "image_count",
    "load_dataset",
    "loader_workers",
    "media_of",
    "micro_batches_per_epoch",
    "mixture_counts",
    "parse_conversation",
    "rank_epoch_order",
    "rank_sample_counts",
    "rank_share",
    "read_frames",
    "resolve_max_length",
    "token_lengths",
]
