"""The data pipeline: LLaVA conversation JSON in storage → a data plan → per-epoch sample order → batches.

- ``sources``: reading a dataset (a conversation list, or a qa-generator manifest pointing at one).
- ``records``: one record's conversation and visual input, checked.
- ``media``: which storage key a record's media path means, and reading its frames.
- ``tokens``: the per-sample token budget and exact token lengths.
- ``plan``: ``build_plan`` checks every record's structure and that its media exist, measures its token
  length, and keeps the usable samples. Bad samples are reported (id, dataset, reason) and counted; more
  than the allowed fraction fails the run before training starts. The plan is stored with the run, so a
  resumed run trains on exactly the same samples in exactly the same order.
- ``order``: ``epoch_order`` mixes the datasets by weight and groups samples of similar length.
- ``collate``: ``Collator`` turns samples into a padded ``Batch`` with answer-only labels.

The names below are the pipeline's public interface; import them from here.
"""

from __future__ import annotations

from .collate import Batch, Collator
from .media import MediaResolver, candidate_keys, read_frames
from .order import epoch_order, mixture_counts
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
    "Sample",
    "build_plan",
    "candidate_keys",
    "check_bad_fraction",
    "epoch_order",
    "image_count",
    "load_dataset",
    "media_of",
    "mixture_counts",
    "parse_conversation",
    "read_frames",
    "resolve_max_length",
    "token_lengths",
]
