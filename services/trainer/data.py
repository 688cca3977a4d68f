"""The data pipeline: LLaVA conversation JSON in storage → a data plan → per-epoch sample order → batches.

- ``build_plan`` reads each dataset (a conversation list, or a qa-generator manifest pointing at one),
  checks every record's structure and that its media exist, measures its token length, and keeps the
  usable samples. Bad samples are reported (id, dataset, reason) and counted; more than the allowed
  fraction fails the run before training starts. The plan is stored with the run, so a resumed run
  trains on exactly the same samples in exactly the same order.
- ``epoch_order`` mixes the datasets by weight (each dataset's share of an epoch is its weight over the
  sum) and groups samples of similar length (transformers' length-grouped sampling) to cut padding.
- ``Collator`` loads frames (PyAV for mp4, PIL for images), applies the chat template, masks the loss to
  the answer tokens, truncates and pads. A sample whose media fail at that point becomes a fully masked
  placeholder (black frames, no labels) so every process still runs the same modules; it is counted.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from .spec import DatasetSource

VIDEO, IMAGE, FRAMES = "video", "image", "frames"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDERS = ("<image>", "<video>")
# Reported bad samples kept in the plan (all are counted).
MAX_REPORTED_BAD = 1000


@dataclass(frozen=True)
class Sample:
    """One usable record: where it is, its resolved media keys and its token length (visual included)."""

    dataset: int
    index: int
    id: str
    kind: str
    media: tuple[str, ...]
    length: int

    @property
    def uid(self) -> str:
        return f"{self.dataset}/{self.index}/{self.id}"


@dataclass(frozen=True)
class BadSample:
    dataset: int
    index: int
    id: str
    reason: str


@dataclass
class DataPlan:
    """The run's usable samples per dataset, the bad ones, and what the datasets were (for resume)."""

    samples: list[Sample]
    bad: list[BadSample]
    bad_count: int
    total: int
    datasets: list[dict]
    bucket: str
    num_frames: int
    max_length: int

    def to_dict(self) -> dict:
        return {
            "datasets": self.datasets,
            "bucket": self.bucket,
            "num_frames": self.num_frames,
            "max_length": self.max_length,
            "total": self.total,
            "bad_count": self.bad_count,
            "samples": [[s.dataset, s.index, s.id, s.kind, list(s.media), s.length] for s in self.samples],
            "bad": [asdict(b) for b in self.bad],
        }

    @classmethod
    def from_dict(cls, data: dict) -> DataPlan:
        return cls(
            samples=[
                Sample(d, i, sid, kind, tuple(media), n) for d, i, sid, kind, media, n in data["samples"]
            ],
            bad=[BadSample(**b) for b in data["bad"]],
            bad_count=data["bad_count"],
            total=data["total"],
            datasets=data["datasets"],
            bucket=data["bucket"],
            num_frames=data["num_frames"],
            max_length=data["max_length"],
        )

    def per_dataset(self) -> list[list[int]]:
        """Indices into ``samples`` grouped by dataset."""
        groups: list[list[int]] = [[] for _ in self.datasets]
        for i, sample in enumerate(self.samples):
            groups[sample.dataset].append(i)
        return groups


@dataclass(frozen=True)
class Conversation:
    system: str | None
    turns: tuple[tuple[str, str | None], ...]


# --- reading datasets ------------------------------------------------------------------------------


@dataclass
class LoadedDataset:
    records: list
    # Folder the record's relative media paths are resolved against (and its parents).
    base_folder: str
    bucket: str | None
    conversation_key: str
    sha256: str


def load_dataset(store: ObjectStore, source: DatasetSource, index: int) -> LoadedDataset:
    """The records of one dataset. ``source.key`` is a conversation list or a manifest (a JSON object)
    naming one with a ``.../conversations/train.json`` file entry."""
    where = f"datasets[{index}].dataset"
    bucket = source.bucket or None
    if not store.exists(source.key, bucket=bucket):
        raise NotFound(f"no dataset object {source.key!r}", field=f"{where}.key")
    ref = store.stat(source.key, bucket=bucket)
    if source.sha256 and ref.sha256 != source.sha256:
        raise FailedPrecondition(
            f"{source.key!r} changed: its sha256 is {ref.sha256}, the request says {source.sha256}",
            field=f"{where}.sha256",
        )
    data = _json(store, source.key, bucket, where)
    key, sha = source.key, ref.sha256
    if isinstance(data, dict):
        key, listed_sha = _conversation_key_from_manifest(data, source.key, where)
        if not store.exists(key, bucket=bucket):
            raise NotFound(f"the manifest names {key!r}, which does not exist", field=f"{where}.key")
        sha = store.stat(key, bucket=bucket).sha256
        if listed_sha and listed_sha != sha:
            raise FailedPrecondition(f"{key!r} does not match its manifest entry", field=f"{where}.key")
        data = _json(store, key, bucket, where)
        base = posixpath.dirname(source.key)
    else:
        base = posixpath.dirname(key)
    if not isinstance(data, list):
        raise InvalidArgument("a conversation dataset must be a JSON list of records", field=f"{where}.key")
    return LoadedDataset(data, base, bucket, key, sha)


def _json(store: ObjectStore, key: str, bucket: str | None, where: str):
    import json

    try:
        return json.loads(store.get_bytes(key, bucket=bucket))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{key!r} is not valid JSON: {exc}", field=f"{where}.key") from exc


def _conversation_key_from_manifest(manifest: dict, manifest_key: str, where: str) -> tuple[str, str]:
    """(key, listed sha256) of the training conversations a qa-generator manifest lists: the ``files``
    entry (``{"path", "key", "sha256", ...}``) for ``conversations/train.json``; a path without a key is
    relative to the manifest's folder."""
    folder = posixpath.dirname(manifest_key)
    for entry in manifest.get("files", []):
        if not isinstance(entry, dict):
            continue
        path = entry.get("path") or entry.get("key") or ""
        if path == "conversations/train.json" or path.endswith("/conversations/train.json"):
            key = entry.get("key") or posixpath.join(folder, path)
            return key, str(entry.get("sha256") or "")
    raise InvalidArgument(
        "the manifest lists no conversations/train.json (the dataset was built without LLaVA JSON?)",
        field=f"{where}.key",
    )


def parse_conversation(record: dict) -> Conversation:
    """LLaVA ``conversations`` → (system, [(question, answer)]); raises ValueError saying what is wrong."""
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ValueError("no 'conversations' list")
    system = None
    turns: list[tuple[str, str | None]] = []
    expected = "user"
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise ValueError(f"conversation turn {n} is not a {{'from', 'value'}} object")
        role = _ROLES.get(str(message.get("from", "")).lower())
        text = message["value"]
        if role == "system" and n == 0:
            system = text
            continue
        if role != expected:
            raise ValueError(f"conversation turn {n} is from {message.get('from')!r}, expected {expected}")
        if role == "user":
            turns.append((_strip_placeholders(text), None))
            expected = "assistant"
        else:
            if not text.strip():
                raise ValueError(f"conversation turn {n} has an empty answer")
            turns[-1] = (turns[-1][0], text)
            expected = "user"
    answered = tuple(t for t in turns if t[1] is not None)
    if not answered:
        raise ValueError("no answer to train on")
    return Conversation(system, answered)


def _strip_placeholders(text: str) -> str:
    for placeholder in _PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return text.strip()


def media_of(record: dict) -> tuple[str, list[str]]:
    """(kind, relative-or-absolute keys) of a record's visual input; ValueError if it has none."""
    if isinstance(record.get("video"), str) and record["video"]:
        return VIDEO, [record["video"]]
    frames = record.get("frames")
    if isinstance(frames, list) and frames and all(isinstance(f, str) and f for f in frames):
        return FRAMES, list(frames)
    image = record.get("image")
    if isinstance(image, str) and image:
        return IMAGE, [image]
    if isinstance(image, list) and image and all(isinstance(i, str) and i for i in image):
        return FRAMES, list(image)
    raise ValueError("no 'video', 'frames' or 'image' (text-only samples are not supported)")


def candidate_keys(path: str, base_folder: str) -> list[str]:
    """Keys a media path may mean: relative to the dataset file's folder, then each folder above it,
    then the path as a key of its own."""
    path = path.lstrip("/")
    candidates = []
    folder = base_folder
    while folder:
        candidates.append(posixpath.normpath(posixpath.join(folder, path)))
        folder = posixpath.dirname(folder)
    candidates.append(posixpath.normpath(path))
    return [c for c in dict.fromkeys(candidates) if not c.startswith("..") and c != "."]


class MediaResolver:
    """Finds which candidate key exists, with a bounded thread pool (one HEAD per key on S3)."""

    def __init__(self, store: ObjectStore, bucket: str | None, workers: int = 16) -> None:
        self.store = store
        self.bucket = bucket
        self.workers = workers
        self._exists: dict[str, bool] = {}

    def _check(self, key: str) -> bool:
        try:
            return self.store.exists(key, bucket=self.bucket)
        except InvalidArgument:
            return False

    def resolve_all(self, paths: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        """{(path, base_folder): existing key or None} for every pair."""
        unresolved = {pair: candidate_keys(*pair) for pair in dict.fromkeys(paths)}
        result: dict[tuple[str, str], str | None] = {}
        with ThreadPoolExecutor(self.workers) as pool:
            depth = 0
            while unresolved:
                wanted = {cands[depth] for cands in unresolved.values() if depth < len(cands)}
                wanted -= self._exists.keys()
                for key, ok in zip(wanted, pool.map(self._check, wanted), strict=True):
                    self._exists[key] = ok
                for pair, cands in list(unresolved.items()):
                    if depth >= len(cands):
                        result[pair] = None
                        del unresolved[pair]
                    elif self._exists[cands[depth]]:
                        result[pair] = cands[depth]
                        del unresolved[pair]
                depth += 1
        return result


# --- planning --------------------------------------------------------------------------------------


def resolve_max_length(requested: int, processor, num_frames: int, model_max_positions: int) -> int:
    """The per-sample token budget: as requested, or 2048 text tokens plus the frames' visual tokens,
    capped by the model's context. It must leave room for the frames and a short exchange."""
    visual = num_frames * video_llm.image_token_count(processor)
    length = requested or min(2048 + visual, model_max_positions or 2048 + visual)
    if length < visual + 16:
        raise InvalidArgument(
            f"{length} tokens cannot hold {num_frames} frames of {visual // num_frames} visual tokens "
            f"plus text; use >= {visual + 16} or fewer frames",
            field="hyperparameters.max_length",
        )
    return length


def build_plan(
    store: ObjectStore,
    sources: Sequence[DatasetSource],
    processor,
    *,
    num_frames: int,
    max_length: int,
    max_bad_fraction: float,
    log: Callable[[str], None] = lambda _msg: None,
) -> DataPlan:
    """Scan every dataset into a DataPlan; FailedPrecondition if too many samples are unusable."""
    loaded = [load_dataset(store, source, i) for i, source in enumerate(sources)]
    bucket = sources[0].bucket or store.default_bucket
    bad: list[BadSample] = []
    bad_count = 0
    pending = []  # (dataset, index, id, kind, paths, conversation)
    for d, dataset in enumerate(loaded):
        for i, record in enumerate(dataset.records):
            rid = str(record.get("id", i)) if isinstance(record, dict) else str(i)
            try:
                if not isinstance(record, dict):
                    raise ValueError("record is not a JSON object")
                conv = parse_conversation(record)
                kind, paths = media_of(record)
            except ValueError as exc:
                bad_count += 1
                bad.append(BadSample(d, i, rid, str(exc)))
                continue
            pending.append((d, i, rid, kind, paths, conv))

    resolver = MediaResolver(store, sources[0].bucket or None)
    pairs = [(p, loaded[d].base_folder) for d, _, _, _, paths, _ in pending for p in paths]
    resolved = resolver.resolve_all(pairs)
    lengths = token_lengths(
        processor, [(_image_count(kind, paths, num_frames), conv) for *_, kind, paths, conv in pending]
    )
    prefix_lengths: dict[int, int] = {}
    samples: list[Sample] = []
    for n, (d, i, rid, kind, paths, conv) in enumerate(pending):
        missing = [p for p in paths if resolved[(p, loaded[d].base_folder)] is None]
        reason = ""
        if missing:
            reason = f"missing media: {missing[0]!r}" + (
                f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            )
        elif lengths[n] > max_length:
            if n not in prefix_lengths:
                prefix_lengths[n] = token_lengths(
                    processor, [(_image_count(kind, paths, num_frames), conv)], prompt_only=True
                )[0]
            if prefix_lengths[n] + 1 > max_length:
                reason = (
                    f"needs {prefix_lengths[n]} tokens before its first answer; max_length is {max_length}"
                )
        if reason:
            bad_count += 1
            bad.append(BadSample(d, i, rid, reason))
            continue
        keys = tuple(resolved[(p, loaded[d].base_folder)] for p in paths)
        samples.append(Sample(d, i, rid, kind, keys, min(lengths[n], max_length)))

    total = sum(len(ds.records) for ds in loaded)
    for b in bad[:20]:
        log(f"bad sample {b.id!r} (dataset {b.dataset}, record {b.index}): {b.reason}")
    plan = DataPlan(
        samples=samples,
        bad=bad[:MAX_REPORTED_BAD],
        bad_count=bad_count,
        total=total,
        datasets=[
            {
                "key": ds.conversation_key,
                "sha256": ds.sha256,
                "records": len(ds.records),
                "weight": src.weight,
            }
            for ds, src in zip(loaded, sources, strict=True)
        ],
        bucket=bucket,
        num_frames=num_frames,
        max_length=max_length,
    )
    check_bad_fraction(plan, max_bad_fraction)
    return plan


def check_bad_fraction(plan: DataPlan, max_bad_fraction: float) -> None:
    if not plan.samples:
        raise FailedPrecondition(
            f"none of the {plan.total} samples is usable; first problem: {_first_bad(plan)}", field="datasets"
        )
    fraction = plan.bad_count / max(plan.total, 1)
    if fraction > max_bad_fraction:
        raise FailedPrecondition(
            f"{plan.bad_count} of {plan.total} samples ({fraction:.1%}) are unusable, more than "
            f"max_bad_sample_fraction={max_bad_fraction:g}; first problem: {_first_bad(plan)}",
            field="datasets",
        )


def _first_bad(plan: DataPlan) -> str:
    if not plan.bad:
        return "none recorded"
    b = plan.bad[0]
    return f"sample {b.id!r} (dataset {b.dataset}, record {b.index}): {b.reason}"


def _image_count(kind: str, paths: Sequence[str], num_frames: int) -> int:
    return 1 if kind == IMAGE else num_frames


def token_lengths(
    processor, items: Sequence[tuple[int, Conversation]], *, prompt_only: bool = False
) -> list[int]:
    """Exact token counts (visual tokens included) of conversations with ``n`` frames each; with
    ``prompt_only``, of everything before the first answer."""
    if not items:
        return []
    per_image = video_llm.image_token_count(processor)
    texts = []
    for n_images, conv in items:
        turns = conv.turns[:1] if prompt_only else conv.turns
        if prompt_only:
            turns = ((turns[0][0], None),)
        messages = video_llm.conversation(n_images, turns, system=conv.system)
        texts.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt_only)
        )
    encoded = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) + n * (per_image - 1) for ids, (n, _) in zip(encoded, items, strict=True)]


# --- ordering --------------------------------------------------------------------------------------


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


# --- batches ---------------------------------------------------------------------------------------


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
        from PIL import Image

        if sample.kind == VIDEO:
            data = self.store.get_bytes(sample.media[0], bucket=self.bucket)
            return video_llm.read_video_frames(data, self.num_frames)
        keys = (
            sample.media if sample.kind == IMAGE else video_llm.sample_frames(sample.media, self.num_frames)
        )
        images = []
        for key in keys:
            with Image.open(io.BytesIO(self.store.get_bytes(key, bucket=self.bucket))) as img:
                images.append(img.convert("RGB"))
        return images

    def encode(self, sample: Sample) -> tuple[dict, str]:
        """(encoded sample, "" or why it became a masked placeholder)."""
        from PIL import Image

        conv = parse_conversation(self.datasets[sample.dataset].records[sample.index])
        n_images = _image_count(sample.kind, sample.media, self.num_frames)
        try:
            frames = self.frames(sample)
            reason = ""
        except Exception as exc:  # noqa: BLE001 - any unreadable media is a bad sample, not a dead run
            frames = [Image.new("RGB", self.frame_size) for _ in range(n_images)]
            reason = f"unreadable media {sample.media[0]!r}: {type(exc).__name__}: {exc}"
        messages = video_llm.conversation(frames, conv.turns, system=conv.system)
        encoded = video_llm.encode_conversation(self.processor, messages)
        if len(encoded["input_ids"]) > self.max_length:
            for name in ("input_ids", "attention_mask", "labels"):
                encoded[name] = encoded[name][: self.max_length]
            expected = n_images * video_llm.image_token_count(self.processor)
            kept = int((encoded["input_ids"] == self.image_token_id).sum())
            if kept != expected and not reason:
                reason = f"truncation to {self.max_length} tokens would cut its frames"
        if reason:
            encoded["labels"] = torch.full_like(encoded["input_ids"], -100)
            if int(
                (encoded["input_ids"] == self.image_token_id).sum()
            ) != n_images * video_llm.image_token_count(self.processor):
                # Too long even as a placeholder: keep the frames and a minimal prompt.
                encoded = video_llm.encode_conversation(
                    self.processor, video_llm.conversation(frames, [("", "-")], system=conv.system)
                )
                encoded["labels"] = torch.full_like(encoded["input_ids"], -100)
        return encoded, reason

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        encoded, reasons = zip(*(self.encode(s) for s in samples), strict=True)
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
