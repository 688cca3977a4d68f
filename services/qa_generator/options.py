"""What a dataset build is asked to produce, validated before anything is read or written.

Zero values mean "the service default" (proto3 cannot tell unset from zero), so the servicer can pass
request fields straight through and the defaults live in one place: ``QaSettings``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dreamframe.errors import InvalidArgument
from services.qa_generator.profiles import get_profile
from services.qa_generator.settings import QaSettings

LLAVA_JSON = "llava_json"
VIDEO_MP4 = "video_mp4"
FRAME_LIST = "frame_list"
MVBENCH_MC = "mvbench_mc"
FORMATS = (LLAVA_JSON, VIDEO_MP4, FRAME_LIST, MVBENCH_MC)
DEFAULT_FORMATS = (LLAVA_JSON, VIDEO_MP4, MVBENCH_MC)

SPLITS = ("train", "validation", "test")
MIN_CHOICES, MAX_CHOICES = 2, 10
MAX_VIDEO_SIZE = 4096


@dataclass(frozen=True)
class DatasetOptions:
    """Validated build options (every field has its final value; see ``make_options``)."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    fps: float = 2.0
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    include_subtitles: bool = False
    num_choices: int = 4
    video_size: int = 336
    # The trainer the records are for (profiles.py) and the longest span video in seconds.
    profile: str = "llama-vid"
    max_video_seconds: float = 300.0
    # From QaSettings (not in the request): how conversations and videos are shaped.
    max_turns_per_conversation: int = 8
    max_subtitle_lines: int = 40
    dialogue_questions_per_tiny_story: int = 4
    video_codec: str = "auto"
    video_crf: int = 23

    def wants(self, fmt: str) -> bool:
        return fmt in self.formats

    @property
    def max_video_frames(self) -> int:
        """Most keyframes one span video holds (at ``fps``)."""
        return max(1, math.floor(self.max_video_seconds * self.fps + 1e-9))

    def as_dict(self) -> dict[str, object]:
        """What the manifest and dataset card record about how the dataset was made."""
        return {
            "formats": list(self.formats),
            "fps": self.fps,
            "validation_fraction": self.validation_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "include_subtitles": self.include_subtitles,
            "num_choices": self.num_choices,
            "video_size": self.video_size,
            "profile": self.profile,
            "max_video_seconds": self.max_video_seconds,
            "max_turns_per_conversation": self.max_turns_per_conversation,
            "max_subtitle_lines": self.max_subtitle_lines,
            "dialogue_questions_per_tiny_story": self.dialogue_questions_per_tiny_story,
            "video_codec": self.video_codec,
            "video_crf": self.video_crf,
        }


def parse_formats(values: Iterable[str], *, field: str = "options.formats") -> tuple[str, ...]:
    """Known format names in canonical order, duplicates dropped; empty means the defaults."""
    chosen: set[str] = set()
    for i, value in enumerate(values):
        if value not in FORMATS:
            raise InvalidArgument(
                f"unknown output format {value!r} (known: {', '.join(FORMATS)})", field=f"{field}.{i}"
            )
        chosen.add(value)
    if not chosen:
        return DEFAULT_FORMATS
    return tuple(f for f in FORMATS if f in chosen)


def make_options(
    *,
    formats: Iterable[str] = (),
    fps: float = 0.0,
    validation_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    include_subtitles: bool = False,
    num_choices: int = 0,
    video_size: int = 0,
    profile: str = "",
    max_video_seconds: float = 0.0,
    settings: QaSettings | None = None,
) -> DatasetOptions:
    """Request values (zero = default) + service settings → validated options; errors name the field."""
    settings = settings or QaSettings()
    if not math.isfinite(fps) or fps < 0:
        raise InvalidArgument(f"must be > 0 frames per second, got {fps}", field="options.fps")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"must be between 0 and 1, got {value}", field=f"options.{name}")
    if validation_fraction + test_fraction > 1.0 + 1e-9:
        raise InvalidArgument(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction:g} exceeds 1",
            field="options.test_fraction",
        )
    num_choices = num_choices or settings.num_choices
    if not MIN_CHOICES <= num_choices <= MAX_CHOICES:
        raise InvalidArgument(
            f"must be between {MIN_CHOICES} and {MAX_CHOICES}, got {num_choices}", field="options.num_choices"
        )
    video_size = video_size or settings.video_size
    if not 16 <= video_size <= MAX_VIDEO_SIZE:
        raise InvalidArgument(
            f"must be between 16 and {MAX_VIDEO_SIZE} pixels, got {video_size}", field="options.video_size"
        )
    fps = float(fps or settings.fps)
    chosen = get_profile(profile or settings.profile)
    chosen_formats = parse_formats(formats)
    if LLAVA_JSON in chosen_formats and VIDEO_MP4 not in chosen_formats:
        raise InvalidArgument(chosen.frames_only_refusal(), field="options.formats")
    if VIDEO_MP4 in chosen_formats and round(fps / chosen.video_fps) < 1:
        raise InvalidArgument(
            f"profile {chosen.name!r}: the trainer keeps every round(fps / {chosen.video_fps})-th video "
            f"frame, which is 0 at {fps:g} fps (the sample fails to load); use more than 0.5",
            field="options.fps",
        )
    if not math.isfinite(max_video_seconds) or max_video_seconds < 0:
        raise InvalidArgument(
            f"must be > 0 seconds, got {max_video_seconds}", field="options.max_video_seconds"
        )
    max_video_seconds = float(max_video_seconds or settings.max_video_seconds)
    if max_video_seconds * fps < 1:
        raise InvalidArgument(
            f"{max_video_seconds:g} s at {fps:g} fps holds no frame", field="options.max_video_seconds"
        )
    return DatasetOptions(
        formats=chosen_formats,
        fps=fps,
        validation_fraction=float(validation_fraction),
        test_fraction=float(test_fraction),
        seed=int(seed),
        include_subtitles=bool(include_subtitles),
        num_choices=int(num_choices),
        video_size=int(video_size),
        profile=chosen.name,
        max_video_seconds=max_video_seconds,
        max_turns_per_conversation=settings.max_turns_per_conversation,
        max_subtitle_lines=settings.max_subtitle_lines,
        dialogue_questions_per_tiny_story=settings.dialogue_questions_per_tiny_story,
        video_codec=settings.video_codec,
        video_crf=settings.video_crf,
    )
