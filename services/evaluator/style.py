"""Style consistency of keyframes, the paper's claim made measurable: the mean pairwise cosine
similarity of CLIP-style image embeddings between frames of the same story ("within") against frames of
different stories ("across"). A style-consistent renderer gives within well above across; the gap is
the measure.

within_story: the mean over stories of each story's mean over its frame pairs (i != j);
across_stories: the mean over story pairs of the mean over their cross pairs; gap = within - across.
Means over pairs come from sums of unit vectors, so the cost is linear in the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import torch

from dreamframe.models.clip_vision import ImageEncoder

from .benchmarks.base import Location, ScoreRow
from .items import ItemError, natural_key
from .video import IMAGE_EXTENSIONS, frame_list_indices, open_image


@dataclass
class StoryFrames:
    label: str
    keys: list[str]


@dataclass
class StyleResult:
    rows: list[ScoreRow] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    stories: list[dict] = field(default_factory=list)


def list_story_frames(location: Location, *, max_frames: int) -> list[str]:
    prefix = location.base.rstrip("/") + "/" if location.base else ""
    keys = sorted(
        (k for k in location.source.list(prefix) if k.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key
    )
    if max_frames > 0 and len(keys) > max_frames:
        keys = [keys[i] for i in frame_list_indices(len(keys), max_frames)]
    return keys


def within_mean(emb: torch.Tensor) -> float | None:
    """Mean cosine over ordered pairs i != j of unit vectors: (|sum|² - n) / (n(n-1))."""
    n = emb.shape[0]
    if n < 2:
        return None
    total = emb.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


def across_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.sum(0) @ b.sum(0) / (a.shape[0] * b.shape[0]))


def embed_story(
    encoder: ImageEncoder, label: str, location: Location, *, max_frames: int = 0
) -> tuple[torch.Tensor | None, list[ItemError]]:
    """Unit embeddings of one story's keyframes (None when it has none that can be read)."""
    keys = list_story_frames(location, max_frames=max_frames)
    if not keys:
        return None, [ItemError(label, label, "no frame images under this prefix")]
    images, errors = [], []
    for key in keys:
        try:
            images.append(open_image(location.source.read_bytes(key)))
        except Exception as exc:  # noqa: BLE001 - one unreadable frame must not sink the story
            errors.append(ItemError(label, key, f"cannot read frame: {exc}"))
    return (encoder.embed(images) if images else None), errors


def summarize(embedded: list[tuple[str, torch.Tensor]], errors: list[ItemError] = ()) -> StyleResult:
    result = StyleResult(errors=list(errors))
    for label, emb in embedded:
        within = within_mean(emb)
        bad = sum(1 for e in errors if e.task == label)
        result.stories.append({"story": label, "frames": int(emb.shape[0]), "within": within})
        result.rows.append(ScoreRow(f"story/{label}", within, int(emb.shape[0]), bad, unit="cosine"))
    withins = [w for w in (within_mean(e) for _, e in embedded) if w is not None]
    frames = sum(int(e.shape[0]) for _, e in embedded)
    within = sum(withins) / len(withins) if withins else None
    across_pairs = [across_mean(a, b) for (_, a), (_, b) in combinations(embedded, 2)]
    across = sum(across_pairs) / len(across_pairs) if across_pairs else None
    gap = within - across if within is not None and across is not None else None
    result.rows += [
        ScoreRow("within_story", within, frames, 0, unit="cosine", extra={"stories": len(withins)}),
        ScoreRow(
            "across_stories", across, frames, 0, unit="cosine", extra={"story_pairs": len(across_pairs)}
        ),
        ScoreRow("gap", gap, frames, 0, unit="cosine"),
    ]
    return result


def style_consistency(
    encoder: ImageEncoder, stories: list[tuple[str, Location]], *, max_frames: int = 0
) -> StyleResult:
    """Embed every story and compare (see the module doc)."""
    embedded, errors = [], []
    for label, location in stories:
        emb, story_errors = embed_story(encoder, label, location, max_frames=max_frames)
        errors += story_errors
        if emb is not None:
            embedded.append((label, emb))
    return summarize(embedded, errors)
