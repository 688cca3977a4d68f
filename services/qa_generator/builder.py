"""BuildDataset: stories + keyframes → a dataset folder, published by writing its manifest last.

Order of work, chosen so a failure at any point never leaves a dataset that looks complete:

1. check every input (stories, frames, options) — errors here write nothing;
2. encode the span videos that do not exist yet (keys carry a content fingerprint, so new videos never
   replace ones an existing manifest points to, and verified ones are reused);
3. if the new dataset differs from the published one, withdraw the old manifest, then write the JSON
   files, stats and card (identical files are left alone);
4. write manifest.json — from here on the dataset is complete — then delete files under the dataset
   folder that the new manifest no longer lists (superseded videos and formats).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dreamframe import keys
from dreamframe.errors import Cancelled, FailedPrecondition, InvalidArgument
from dreamframe.progress import Progress, ProgressClock
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes

from . import formats
from .card import dataset_card
from .index import index_files
from .inputs import LoadedStory, StorySource, load_story_sources
from .options import FRAME_LIST, LLAVA_JSON, MVBENCH_MC, SPLITS, VIDEO_MP4, DatasetOptions
from .samples import LEVELS, SpanQA, remove_duplicate_turns, story_spans
from .splits import assign_splits
from .video import (
    VideoJob,
    VideoSpec,
    count_video_frames,
    encode_spans,
    image_size,
    resolve_codec,
    video_dimensions,
    video_step,
)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class BuildRequest:
    job_id: str
    dataset_name: str
    stories: list[StorySource]
    options: DatasetOptions


@dataclass(frozen=True)
class BuildResult:
    manifest: ObjectRef
    # The dataset's files by path relative to its folder (videos are listed in the manifest only: a
    # large dataset has hundreds of thousands).
    files: list[tuple[str, ObjectRef]]
    counts: dict[str, int]
    prefix: str
    videos_encoded: int
    videos_reused: int


@dataclass
class _StoryPlan:
    loaded: LoadedStory
    split: str
    spans: list[SpanQA]
    frame_hashes: list[str] = field(default_factory=list)
    spec: VideoSpec | None = None
    # span (start, end) → video path relative to the dataset folder, and the keyframe step it shows
    video_paths: dict[tuple[int, int], str] = field(default_factory=dict)
    video_steps: dict[tuple[int, int], int] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


def dataset_name_for(request: BuildRequest) -> str:
    name = request.dataset_name or request.job_id
    if not name:
        raise InvalidArgument("required (or a job_id to name the dataset after)", field="dataset_name")
    keys.validate_id(name, field="dataset_name" if request.dataset_name else "job_id")
    return name


def build_dataset(
    store: ObjectStore,
    request: BuildRequest,
    *,
    on_progress: ProgressFn | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> BuildResult:
    """Build (or finish, or confirm) the dataset the request describes; see the module docstring."""
    report = _Reporter(on_progress)
    if request.job_id:
        keys.validate_id(request.job_id, field="job_id")
    name = dataset_name_for(request)
    prefix = keys.dataset_prefix(name)
    options = request.options
    codec = ""
    if options.wants(VIDEO_MP4):
        codec = resolve_codec(options.video_codec)
        options = dataclasses.replace(options, video_codec=codec)  # the manifest records the real codec

    def check_cancelled() -> None:
        if is_cancelled is not None and is_cancelled():
            raise Cancelled("dataset build cancelled")

    # 1. inputs — read only
    report(Progress("stories", 0, len(request.stories), message="checking stories and frames"))
    stories = load_story_sources(store, request.stories)
    splits = assign_splits(
        [s.story_id for s in stories],
        validation_fraction=options.validation_fraction,
        test_fraction=options.test_fraction,
        seed=options.seed,
    )
    plans: list[_StoryPlan] = []
    duplicates = 0
    for i, loaded in enumerate(stories):
        check_cancelled()
        spans = story_spans(
            loaded.story,
            loaded.story_id,
            dialogue_limit=options.dialogue_questions_per_tiny_story,
            max_span_frames=options.max_video_frames,
        )
        duplicates += remove_duplicate_turns(spans)
        plan = _StoryPlan(loaded=loaded, split=splits[loaded.story_id], spans=spans)
        plan.frame_hashes = [store.stat(key, bucket=loaded.bucket).sha256 for key in loaded.frame_keys]
        plans.append(plan)
        report(Progress("stories", i + 1, len(stories), current_item=loaded.story_id))
    # Outputs in story-id order: listing the same stories in another order builds the same dataset.
    plans.sort(key=lambda p: p.loaded.story_id)

    previous = _read_manifest(store, prefix)

    # 2. videos
    encoded = reused = 0
    video_refs: dict[str, ObjectRef] = {}
    if options.wants(VIDEO_MP4):
        for plan in plans:
            _plan_videos(store, plan, options, codec)
        pending: list[tuple[_StoryPlan, VideoJob]] = []
        for plan in plans:
            for (start, end), rel in sorted(plan.video_paths.items()):
                job = VideoJob(key=rel, start=start, end=end, step=plan.video_steps[(start, end)])
                ref = _reusable_video(store, prefix + rel, len(job.frame_indices), previous)
                if ref is not None:
                    video_refs[rel] = ref
                    reused += 1
                else:
                    pending.append((plan, job))
        total = len(pending)
        # The video reports time the encoding itself: elapsed and ETA since it started.
        clock = ProgressClock(total, "videos")
        report(Progress("videos", 0, total, message=f"{reused} videos reused, {total} to encode"))

        def publish(job: VideoJob, path: Path) -> None:
            nonlocal encoded
            video_refs[job.key] = store.put_file(prefix + job.key, path, content_type="video/mp4")
            encoded += 1
            clock.advance()
            report(clock.progress(job.key))

        for plan in plans:
            jobs = [job for p, job in pending if p is plan]
            if jobs:
                assert plan.spec is not None
                encode_spans(
                    jobs, plan.spec, _frame_loader(store, plan), publish, check_cancelled=check_cancelled
                )
    check_cancelled()

    # 3. records, stats, card
    files, counts, stats, index = _dataset_files(store, plans, options, duplicates, video_refs, name, prefix)
    out_bucket = store.default_bucket
    file_refs: dict[str, ObjectRef] = {
        rel: ObjectRef(out_bucket, prefix + rel, len(data), sha256_bytes(data)) for rel, data in files.items()
    }
    file_refs.update(video_refs)
    manifest_bytes = _json_bytes(
        {
            "format": "dreamframe-dataset",
            "version": MANIFEST_VERSION,
            "name": name,
            "job_id": request.job_id,
            "bucket": out_bucket,
            "prefix": prefix,
            "options": options.as_dict(),
            "stories": [
                {
                    "story_id": p.loaded.story_id,
                    "split": p.split,
                    "story": _ref_dict(p.loaded.story_ref),
                    "frames_prefix": p.loaded.frames_prefix,
                    "frames": len(p.loaded.frame_keys),
                }
                for p in plans
            ],
            "counts": counts,
            # Sharded record index (index.py): trainers plan from it without reading every record.
            "index": index,
            "files": [{"path": rel, **_ref_dict(file_refs[rel])} for rel in sorted(file_refs)],
        }
    )
    manifest_key = prefix + MANIFEST
    report(Progress("files", 0, len(files) + 1, message="writing dataset files"))
    unchanged = (
        previous is not None and previous[0] == manifest_bytes and _all_verified(store, file_refs.values())
    )
    if unchanged:
        manifest_ref = store.stat(manifest_key)
    else:
        if store.exists(manifest_key):
            # The old manifest would describe files about to change: withdraw it first.
            store.delete(manifest_key)
        for i, (rel, data) in enumerate(sorted(files.items())):
            check_cancelled()
            if not store.verify(file_refs[rel]):
                file_refs[rel] = store.put_bytes(prefix + rel, data, content_type=_content_type(rel))
            report(Progress("files", i + 1, len(files) + 1, current_item=rel))
        # 4. publish
        manifest_ref = store.put_bytes(manifest_key, manifest_bytes, content_type="application/json")
        listed = {ref.key for ref in file_refs.values()} | {manifest_key}
        for info in list(store.list(prefix)):
            if info.key not in listed:
                store.delete(info.key)
    report(
        Progress("files", len(files) + 1, len(files) + 1, current_item=MANIFEST, message="dataset complete")
    )
    return BuildResult(
        manifest=manifest_ref,
        files=[(rel, file_refs[rel]) for rel in sorted(files)],
        counts=counts,
        prefix=prefix,
        videos_encoded=encoded,
        videos_reused=reused,
    )


# --- videos ---------------------------------------------------------------------------------------------


def _plan_videos(store: ObjectStore, plan: _StoryPlan, options: DatasetOptions, codec: str) -> None:
    loaded = plan.loaded
    width, height = image_size(store.get_bytes(loaded.frame_keys[0], bucket=loaded.bucket))
    w, h = video_dimensions(width, height, options.video_size)
    plan.spec = VideoSpec(codec=codec, fps=options.fps, width=w, height=h, crf=options.video_crf)
    for span in plan.spans:
        if (span.start, span.end) not in plan.video_paths:
            # A span longer than the cap shows every step-th keyframe: still the whole span (its QA is
            # about all of it) in at most max_video_seconds.
            step = video_step(span.num_frames, options.max_video_frames)
            fingerprint = plan.spec.fingerprint(plan.frame_hashes[span.start : span.end : step])
            every = f"s{step}" if step > 1 else ""
            plan.video_paths[(span.start, span.end)] = (
                f"videos/{loaded.story_id}/{span.start:06d}-{span.end:06d}{every}_{fingerprint}.mp4"
            )
            plan.video_steps[(span.start, span.end)] = step


def _reusable_video(
    store: ObjectStore, key: str, num_frames: int, previous: tuple[bytes, dict[str, ObjectRef]] | None
) -> ObjectRef | None:
    """The stored video at ``key`` if it is verified: as the previous manifest recorded it, or (after an
    interrupted build, with no manifest to compare against) a readable mp4 with the right frame count."""
    if not store.exists(key):
        return None
    if previous is not None and key in previous[1]:
        ref = previous[1][key]
        return ref if store.verify(ref) else None
    data = store.get_bytes(key)
    if count_video_frames(data) != num_frames:
        return None
    return ObjectRef(store.default_bucket, key, len(data), sha256_bytes(data))


def _frame_loader(store: ObjectStore, plan: _StoryPlan) -> Callable[[int], bytes]:
    def load(index: int) -> bytes:
        key = plan.loaded.frame_keys[index]
        data = store.get_bytes(key, bucket=plan.loaded.bucket)
        if sha256_bytes(data) != plan.frame_hashes[index]:
            raise FailedPrecondition(f"keyframe {key!r} changed during the build", field="stories")
        return data

    return load


# --- records -----------------------------------------------------------------------------------------------


def _dataset_files(
    store: ObjectStore,
    plans: list[_StoryPlan],
    options: DatasetOptions,
    duplicates: int,
    video_refs: dict[str, ObjectRef],
    name: str,
    prefix: str,
) -> tuple[dict[str, bytes], dict[str, int], dict, dict]:
    conversations: dict[str, list[dict]] = {s: [] for s in SPLITS}
    mc_items: dict[str, list[dict]] = {s: [] for s in SPLITS}
    frame_lists: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts: Counter[str] = Counter()
    qa_by_kind: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    span_frames: dict[str, list[int]] = defaultdict(list)
    unique_spans: set[tuple[str, int, int]] = set()
    mc_skipped = 0
    video_frames = 0
    for plan in plans:
        split = plan.split
        counts[f"{split}/stories"] += 1
        pool = formats.answer_pool(plan.spans)
        frame_refs = [
            {"key": key, "sha256": sha}
            for key, sha in zip(plan.loaded.frame_keys, plan.frame_hashes, strict=True)
        ]
        for span in plan.spans:
            visual = formats.Visual(
                video=plan.video_paths.get((span.start, span.end)),
                frames=plan.loaded.frame_keys[span.start : span.end],
                step=plan.video_steps.get((span.start, span.end), 1),
            )
            records = (
                formats.conversations(
                    span,
                    visual,
                    max_turns=options.max_turns_per_conversation,
                    include_subtitles=options.include_subtitles,
                    max_subtitle_lines=options.max_subtitle_lines,
                )
                if options.wants(LLAVA_JSON)
                else []
            )
            conversations[split].extend(records)
            counts[f"{split}/{span.level}"] += len(records)
            counts[f"{split}/qa_pairs"] += len(span.turns)
            qa_by_kind[split].update(turn.kind for turn in span.turns)
            span_frames[span.level].append(span.num_frames)
            if (span.story_id, span.start, span.end) not in unique_spans:
                unique_spans.add((span.story_id, span.start, span.end))
                video_frames += len(range(span.start, span.end, visual.step))
                entry = formats.frame_list_entry(span, visual, frame_refs)
                frame_lists[split].append({**entry, "bucket": plan.loaded.bucket})
            if options.wants(MVBENCH_MC):
                items, skipped = formats.multiple_choice(
                    span, visual, pool, num_choices=options.num_choices, seed=options.seed
                )
                mc_items[split].extend(items)
                counts[f"{split}/mc_items"] += len(items)
                mc_skipped += skipped
    counts["duplicates_removed"] = duplicates
    counts["mc_skipped"] = mc_skipped
    counts["videos"] = len(video_refs)
    counts["frames"] = sum(len(p.loaded.frame_keys) for p in plans)
    stats = {
        "counts": dict(sorted(counts.items())),
        "qa_by_kind": {s: dict(sorted(c.items())) for s, c in qa_by_kind.items()},
        "splits": {s: [p.loaded.story_id for p in plans if p.split == s] for s in SPLITS},
        "frames": {
            "total": counts["frames"],
            "per_story": {p.loaded.story_id: len(p.loaded.frame_keys) for p in plans},
            "spans": {
                level: {
                    "count": len(span_frames[level]),
                    "min": min(span_frames[level]),
                    "max": max(span_frames[level]),
                    "mean": statistics.fmean(span_frames[level]),
                }
                for level in LEVELS
                if span_frames[level]
            },
            "video_seconds": video_frames / options.fps,
            "video_sizes": {p.loaded.story_id: [p.spec.width, p.spec.height] for p in plans if p.spec},
        },
    }
    files: dict[str, bytes] = {}
    index: dict[str, dict] = {}
    for split in SPLITS:
        if options.wants(LLAVA_JSON):
            files[f"conversations/{split}.json"] = _json_bytes(conversations[split])
            shards, index[split] = index_files(split, conversations[split], prefix, video_refs)
            files.update(shards)
        if options.wants(MVBENCH_MC):
            files[f"mc/{split}.json"] = _json_bytes(mc_items[split])
        if options.wants(FRAME_LIST):
            files[f"frames/{split}.json"] = _json_bytes(frame_lists[split])
    files["stats.json"] = _json_bytes(stats)
    files["README.md"] = dataset_card(name, options, stats).encode()
    return files, dict(sorted(counts.items())), stats, index


# --- helpers ----------------------------------------------------------------------------------------------


class _Reporter:
    """Passes reports on, giving those without an elapsed time the build's."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self.callback = callback
        self.clock = ProgressClock(0)

    def __call__(self, progress: Progress) -> None:
        if self.callback is None:
            return
        if not progress.elapsed_seconds:
            progress = dataclasses.replace(progress, elapsed_seconds=self.clock.elapsed)
        self.callback(progress)


def _read_manifest(store: ObjectStore, prefix: str) -> tuple[bytes, dict[str, ObjectRef]] | None:
    """The published manifest's bytes and its files by key; None when there is none or it is unreadable
    (then nothing is reused on its word; whether it exists is checked separately before replacing it)."""
    try:
        data = store.get_bytes(prefix + MANIFEST)
        entries = json.loads(data)["files"]
        refs = {e["key"]: ObjectRef(e["bucket"], e["key"], int(e["size"]), e["sha256"]) for e in entries}
    except Exception:  # noqa: BLE001 - missing or damaged both mean "nothing published to reuse"
        return None
    return data, refs


def _all_verified(store: ObjectStore, refs: Iterable[ObjectRef]) -> bool:
    return all(store.verify(ref) for ref in refs)


def _ref_dict(ref: ObjectRef) -> dict[str, object]:
    return {"bucket": ref.bucket, "key": ref.key, "size": ref.size, "sha256": ref.sha256}


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _content_type(rel: str) -> str:
    if rel.endswith(".jsonl"):
        return "application/x-ndjson"
    return "text/markdown; charset=utf-8" if rel.endswith(".md") else "application/json"
