"""Samples → a padded ``Batch``: media read from storage, the chat template applied, the loss masked to
the answer tokens, truncated and padded. ``encode`` does one sample (in a loader worker), ``pad`` makes
the batch. This is where every sample is checked exactly: a record that does not parse, media that
cannot be read, or a prompt too long to leave an answer token becomes a fully masked placeholder (black
frames, no labels) so every process still runs the same modules; it is counted as a bad sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dreamframe.errors import described
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from .index import record_of
from .media import read_frames
from .plan import Sample
from .records import Conversation, image_count, parse_conversation
from .sources import LoadedDataset


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    uids: list[str]
    bad: int = 0
    bad_reasons: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_label_tokens(self) -> int:
        # The loss predicts token t+1 from t, so the first position never counts.
        return int((self.labels[:, 1:] != -100).sum())

    def model_inputs(self, device: torch.device, dtype: torch.dtype) -> dict:
        inputs = {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "attention_mask": self.attention_mask.to(device, non_blocking=True),
            "labels": self.labels.to(device, non_blocking=True),
        }
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values.to(device, dtype, non_blocking=True)
        return inputs


class Collator:
    """Samples → a padded Batch: media loaded from storage, chat template, answer-only labels."""

    def __init__(
        self,
        store: ObjectStore,
        processor,
        datasets: Sequence[LoadedDataset],
        *,
        bucket: str | None,
        num_frames: int,
        max_length: int,
        pad_to_multiple_of: int = 1,
    ) -> None:
        self.store = store
        self.processor = processor
        self.datasets = datasets
        self.bucket = bucket
        self.num_frames = num_frames
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = processor.image_token_id
        crop = processor.image_processor.crop_size
        self.frame_size = (int(crop["width"]), int(crop["height"]))

    def frames(self, sample: Sample) -> list:
        if not sample.media:
            raise ValueError("its index entry is malformed (no media)")
        return read_frames(self.store, sample.kind, sample.media, self.num_frames, self.bucket, sample.sizes)

    def record(self, sample: Sample, line: bytes | None) -> dict:
        """The sample's LLaVA record: from its index line, or from the dataset read whole."""
        if line is not None:
            return record_of(line)
        return self.datasets[sample.dataset].records[sample.index]

    def encode(self, sample: Sample, line: bytes | None = None) -> tuple[dict, str]:
        """(encoded sample, "" or why it became a masked placeholder)."""
        from PIL import Image

        n_images = image_count(sample.kind, sample.media, self.num_frames)
        try:
            conv = parse_conversation(self.record(sample, line))
            reason = ""
        except Exception as exc:  # noqa: BLE001 - a record that does not parse is a bad sample
            conv, reason = Conversation(None, (("", "-"),)), f"bad record: {described(exc)}"
        frames = None
        if not reason:
            try:
                frames = self.frames(sample)
            except Exception as exc:  # noqa: BLE001 - any unreadable media is a bad sample, not a dead run
                where = sample.media[0] if sample.media else sample.id
                reason = f"unreadable media {where!r}: {described(exc)}"
        if frames is None:
            frames = [Image.new("RGB", self.frame_size) for _ in range(n_images)]
        messages = video_llm.conversation(frames, conv.turns, system=conv.system)
        encoded = video_llm.encode_conversation(self.processor, messages)
        if len(encoded["input_ids"]) > self.max_length:
            for name in ("input_ids", "attention_mask", "labels"):
                encoded[name] = encoded[name][: self.max_length]
            expected = n_images * video_llm.image_token_count(self.processor)
            kept = int((encoded["input_ids"] == self.image_token_id).sum())
            if kept != expected and not reason:
                reason = f"truncation to {self.max_length} tokens would cut its frames"
            elif not reason and not bool((encoded["labels"][1:] != -100).any()):
                reason = f"needs more than max_length={self.max_length} tokens before its first answer"
        if reason:
            encoded["labels"] = torch.full_like(encoded["input_ids"], -100)
            if int(
                (encoded["input_ids"] == self.image_token_id).sum()
            ) != n_images * video_llm.image_token_count(self.processor):
                # Too long even as a placeholder: keep the frames and a minimal prompt.
                encoded = video_llm.encode_conversation(
                    self.processor, video_llm.conversation(frames, [("", "-")], system=None)
                )
                encoded["labels"] = torch.full_like(encoded["input_ids"], -100)
        return encoded, reason

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        return self.pad([(s, *self.encode(s)) for s in samples])

    def pad(self, items: Sequence[tuple[Sample, dict, str]]) -> Batch:
        """Encoded samples (sample, encoded, reason) → one padded Batch."""
        samples, encoded, reasons = zip(*items, strict=True)
        longest = max(len(e["input_ids"]) for e in encoded)
        if self.pad_to_multiple_of > 1:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(encoded)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        for row, e in enumerate(encoded):
            size = len(e["input_ids"])
            input_ids[row, :size] = e["input_ids"]
            attention[row, :size] = e["attention_mask"]
            labels[row, :size] = e["labels"]
        pixels = [e["pixel_values"] for e in encoded if "pixel_values" in e]
        bad_reasons = [f"{s.uid}: {r}" for s, r in zip(samples, reasons, strict=True) if r]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            pixel_values=torch.cat(pixels) if pixels else None,
            uids=[s.uid for s in samples],
            bad=len(bad_reasons),
            bad_reasons=bad_reasons,
        )
