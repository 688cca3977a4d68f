"""What every benchmark loader produces: items (one question on one video), per-item load errors, and
the visual each item is asked about (a video file, a folder of frames or a list of frame images)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from .sources import Source
from .video import IMAGE_EXTENSIONS, decode_video, frame_list_indices, open_image

VisualKind = Literal["video", "frames"]


@dataclass(frozen=True)
class Visual:
    """The pixels of an item. ``video``: one video file at ``key``; ``frames``: the image files
    ``frame_keys`` in order (a frame folder or an explicit list), shown at ``fps``."""

    source: Source = field(compare=False, repr=False)
    kind: VisualKind
    key: str
    frame_keys: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    fps: float | None = None

    def identity(self) -> str:
        """Stable description for reports and cache keys (what is shown, not how it is fetched)."""
        parts = [self.kind, self.source.describe(self.key)]
        if self.kind == "frames":
            digest = hashlib.sha256("\n".join(self.frame_keys).encode()).hexdigest()[:16]
            parts.append(f"{len(self.frame_keys)}@{self.fps}:{digest}")
        if self.start is not None or self.end is not None:
            parts.append(f"[{self.start},{self.end}]")
        return " ".join(parts)

    def load_frames(self, num: int, scratch: Path) -> list[Image.Image]:
        if self.kind == "video":
            with self.source.local_copy(self.key, scratch) as path:
                return decode_video(path, num, start=self.start, end=self.end)
        positions = frame_list_indices(
            len(self.frame_keys), num, fps=self.fps, start=self.start, end=self.end
        )
        cache: dict[int, Image.Image] = {}
        for pos in positions:
            if pos not in cache:
                cache[pos] = open_image(self.source.read_bytes(self.frame_keys[pos]))
        return [cache[pos] for pos in positions]


@dataclass
class Item:
    """One question of one benchmark. ``data`` holds the benchmark's own fields (question, candidates,
    answer, ...), already validated by its loader."""

    benchmark: str
    task: str
    item_id: str
    visual: Visual | None
    data: dict

    def identity(self) -> str:
        payload = {"benchmark": self.benchmark, "task": self.task, "id": self.item_id, "data": self.data}
        if self.visual is not None:
            payload["visual"] = self.visual.identity()
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class ItemError:
    """An item that could not be evaluated, listed in the report instead of aborting the run."""

    task: str
    item_id: str
    reason: str

    def to_json(self) -> dict:
        return {"task": self.task, "item_id": self.item_id, "reason": self.reason}


@dataclass
class LoadedBenchmark:
    items: list[Item] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    # Files read, for the report.
    files: list[str] = field(default_factory=list)


def natural_key(key: str) -> list[object]:
    """Sort '2.png' before '10.png' (reference keyframes are not zero-padded)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def resolve_visual(
    source: Source,
    candidates: list[str],
    *,
    start: float | None = None,
    end: float | None = None,
    folder_fps: float | None = None,
) -> Visual | None:
    """The first candidate that is a file (a video) or a folder of images (frames), else None."""
    for key in candidates:
        if source.exists(key):
            return Visual(source, "video", key, start=start, end=end)
    for key in candidates:
        images = [k for k in source.list(key.rstrip("/") + "/") if k.lower().endswith(IMAGE_EXTENSIONS)]
        if images:
            return Visual(
                source, "frames", key, tuple(sorted(images, key=natural_key)), start, end, folder_fps
            )
    return None


def frame_list_visual(source: Source, keys: list[str], *, fps: float | None = None) -> Visual:
    return Visual(source, "frames", keys[0], tuple(keys), fps=fps)
