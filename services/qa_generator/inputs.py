"""Reading and checking a build's inputs: the stories and their keyframes. Nothing here writes.

Every problem is an error naming the request field (``stories.2.frames_prefix``), raised before the
build writes anything.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from dreamframe import keys
from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.keys import validate_id
from dreamframe.storage.base import (
    ObjectRef,
    ObjectStore,
    sha256_bytes,
    validate_bucket,
    validate_key,
    validate_prefix,
)
from dreamframe.story import Story, load_story

# The layout dreamframe.keys gives stories: jobs/<job>/stories/<sss>/story.json
_JOB_STORY_RE = re.compile(r"^jobs/(?P<job>[^/]+)/stories/(?P<index>\d+)/(?:reference_)?story\.json$")
MAX_NAMED_MISSING = 10


@dataclass(frozen=True)
class StorySource:
    """Where one story and its keyframes are. An empty ``frames_prefix`` means the ``frames/`` folder
    beside the story file; ``sha256``, when given, must match the stored story."""

    key: str
    frames_prefix: str = ""
    bucket: str | None = None
    sha256: str = ""


@dataclass(frozen=True)
class LoadedStory:
    index: int
    story_id: str
    story: Story
    story_ref: ObjectRef
    frames_prefix: str
    frame_keys: tuple[str, ...]

    @property
    def bucket(self) -> str:
        return self.story_ref.bucket


def frame_name(index: int) -> str:
    """The keyframe file name for a story-order index (as dreamframe.keys.frame_key writes it)."""
    return f"{index:06d}.png"


def story_id_for(key: str, bucket: str) -> str:
    """A readable, key-safe id: '<job>-<sss>' for the job layout, else a slug of the key plus a hash."""
    match = _JOB_STORY_RE.match(key)
    if match:
        return validate_id(f"{match['job']}-{match['index']}", field="story_id")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", key.rsplit(".", 1)[0]).strip("-._")[:60] or "story"
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:8]
    return validate_id(f"{slug}-{digest}", field="story_id")


def default_frames_prefix(key: str) -> str | None:
    folder, _, name = key.rpartition("/")
    if folder and name in ("story.json", "reference_story.json"):
        return f"{folder}/frames/"
    return None


def load_story_source(store: ObjectStore, index: int, source: StorySource) -> LoadedStory:
    """Read, parse and check one story and the presence of all its keyframes."""
    field = f"stories.{index}"
    validate_key(source.key, field=f"{field}.story.key")
    bucket = (
        validate_bucket(source.bucket, field=f"{field}.story.bucket", allowed=store.allowed_buckets)
        if source.bucket
        else store.default_bucket
    )
    try:
        data = store.get_bytes(source.key, bucket=bucket)
    except NotFound:
        raise NotFound(
            f"no story object {source.key!r} in bucket {bucket!r}", field=f"{field}.story"
        ) from None
    digest = sha256_bytes(data)
    if source.sha256 and source.sha256.lower() != digest:
        raise FailedPrecondition(
            f"story {source.key!r} changed since it was referenced (sha256 {digest[:12]}…, "
            f"expected {source.sha256[:12]}…)",
            field=f"{field}.story.sha256",
        )
    story = load_story(data, field=f"{field}.story")
    if not story.all_qa():
        raise InvalidArgument(
            f"story {source.key!r} has no QA pairs (level 1, 2 or 3), nothing to build from",
            field=f"{field}.story",
        )
    if story.frame_count == 0:
        raise InvalidArgument(f"story {source.key!r} has no frames", field=f"{field}.story")

    prefix = source.frames_prefix or default_frames_prefix(source.key)
    if not prefix:
        raise InvalidArgument(
            "required: the folder holding the story's <index>.png keyframes", field=f"{field}.frames_prefix"
        )
    prefix = validate_prefix(prefix.rstrip("/") + "/", field=f"{field}.frames_prefix")
    frame_keys = tuple(prefix + frame_name(i) for i in range(story.frame_count))
    present = {info.key for info in store.list(prefix, bucket=bucket)}
    missing = [key.rsplit("/", 1)[1] for key in frame_keys if key not in present]
    if missing:
        named = ", ".join(missing[:MAX_NAMED_MISSING]) + (", ..." if len(missing) > MAX_NAMED_MISSING else "")
        raise InvalidArgument(
            f"{len(missing)} of {len(frame_keys)} frames missing under {prefix!r}: {named}",
            field=f"{field}.frames_prefix",
        )
    return LoadedStory(
        index=index,
        story_id=story_id_for(source.key, bucket),
        story=story,
        story_ref=ObjectRef(bucket=bucket, key=source.key, size=len(data), sha256=digest),
        frames_prefix=prefix,
        frame_keys=frame_keys,
    )


def load_story_sources(store: ObjectStore, sources: list[StorySource]) -> list[LoadedStory]:
    """Every story checked; the same story twice is an error (its QA would be counted twice)."""
    if not sources:
        raise InvalidArgument("at least one story is required", field="stories")
    loaded: list[LoadedStory] = []
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        story = load_story_source(store, i, source)
        if story.story_id in seen:
            raise InvalidArgument(
                f"the same story as stories.{seen[story.story_id]} ({story.story_id})",
                field=f"stories.{i}.story",
            )
        seen[story.story_id] = i
        loaded.append(story)
    return loaded


def sources_from_jobs(
    store: ObjectStore, job_ids: list[str], *, bucket: str | None = None
) -> list[StorySource]:
    """Every story of finished jobs (``jobs/<job>/stories/<sss>/story.json``), frames beside each."""
    sources: list[StorySource] = []
    for i, job_id in enumerate(job_ids):
        prefix = f"{keys.job_prefix(job_id)}stories/"
        found = [
            info.key
            for info in store.list(prefix, bucket=bucket)
            if _JOB_STORY_RE.match(info.key) and info.key.endswith("/story.json")
        ]
        if not found:
            raise NotFound(f"job {job_id!r} has no stories under {prefix!r}", field=f"jobs.{i}")
        sources += [
            StorySource(key=k, frames_prefix=default_frames_prefix(k) or "", bucket=bucket) for k in found
        ]
    return sources
