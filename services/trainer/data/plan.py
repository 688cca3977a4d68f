"""The data plan: what a run trains on, stored with the run so a resumed run trains on exactly the same
samples.

- An indexed dataset (a qa-generator manifest with a record index) is planned from the manifest alone:
  its record count and its index shards (keys, sizes, sha256). Nothing is read per record before
  training; each rank reads its own shards (``share``) and bad samples are counted as they are met.
- Any other dataset (a plain conversation file, an older manifest) is scanned record by record on rank
  0: structure, media (one HEAD per key), exact token length; bad samples are reported and counted, and
  more than the allowed fraction fails the run before training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from dreamframe.errors import FailedPrecondition
from dreamframe.storage.base import ObjectStore

from ..spec import DatasetSource
from .media import MediaResolver
from .records import image_count, media_of, parse_conversation
from .sources import load_dataset
from .tokens import token_lengths

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
    # Sizes of the media objects when the index gives them (a read of another size is a bad sample).
    sizes: tuple[int, ...] = ()

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

    def sizes(self) -> list[int]:
        """Usable samples per dataset: an indexed dataset's records, the others' checked samples."""
        counts = [0 for _ in self.datasets]
        for sample in self.samples:
            counts[sample.dataset] += 1
        for d, dataset in enumerate(self.datasets):
            if dataset.get("index"):
                counts[d] = dataset["index"]["records"]
        return counts

    @property
    def num_samples(self) -> int:
        return sum(self.sizes())

    def per_dataset(self) -> list[list[int]]:
        """Indices into ``samples`` grouped by dataset."""
        groups: list[list[int]] = [[] for _ in self.datasets]
        for i, sample in enumerate(self.samples):
            groups[sample.dataset].append(i)
        return groups


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
        for i, record in enumerate(dataset.records or ()):
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
        processor, [(image_count(kind, paths, num_frames), conv) for *_, kind, paths, conv in pending]
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
                    processor, [(image_count(kind, paths, num_frames), conv)], prompt_only=True
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

    total = sum(ds.index["records"] if ds.index else len(ds.records or ()) for ds in loaded)
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
                "records": ds.index["records"] if ds.index else len(ds.records or ()),
                "weight": src.weight,
            }
            | ({"index": ds.index} if ds.index else {})
            for ds, src in zip(loaded, sources, strict=True)
        ],
        bucket=bucket,
        num_frames=num_frames,
        max_length=max_length,
    )
    check_bad_fraction(plan, max_bad_fraction)
    return plan


def check_bad_fraction(plan: DataPlan, max_bad_fraction: float) -> None:
    if not plan.num_samples:
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
