"""The qa-generator service's own settings: the ``qa`` section
(``DREAMFRAME_QA__*``, ``qa:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class QaSettings(BaseModel):
    # Defaults for requests that leave these at zero.
    fps: float = Field(2.0, gt=0)
    video_size: int = Field(336, ge=16, le=4096)
    num_choices: int = Field(4, ge=2, le=10)
    # Longer spans' QA is split into several conversations on the same video (context length).
    max_turns_per_conversation: int = Field(8, ge=1)
    # Subtitles beyond this many dialogue lines are cut (a whole story has ~700).
    max_subtitle_lines: int = Field(40, ge=1)
    # The trainer the records are written for (profiles.py): "llama-vid" (what services/trainer reads
    # and the paper trains) or "llava-next-video". A request's options.profile overrides it.
    profile: Literal["llama-vid", "llava-next-video"] = "llama-vid"
    # Longest span video in seconds (LLaMA-VID's video data is cut at 5 minutes, its
    # llava_v1_5_mix665k_with_video_chatgpt_maxtime_5min.json): longer spans are shown with every k-th
    # keyframe, and long tiny stories' dialogue questions are asked on parts of at most this length.
    max_video_seconds: float = Field(300.0, gt=0)
    # Dialogue-grounded questions added to each tiny story (0 disables them).
    dialogue_questions_per_tiny_story: int = Field(4, ge=0)
    # "auto": H.264 (libx264) when PyAV's FFmpeg has it, else MPEG-4 part 2.
    video_codec: Literal["auto", "libx264", "mpeg4"] = "auto"
    # libx264 constant rate factor (lower is better quality); mpeg4 maps it to a quantiser.
    video_crf: int = Field(23, ge=0, le=51)
    # Builds running at once (each encodes videos on the CPU); more wait their turn.
    max_concurrent_builds: int = Field(2, ge=1)
