"""A frame in storage: the PNG (prompt, seed, model and settings in its text chunks) and a JSON sidecar.

Write order makes "done" checkable: the PNG first, then its thumbnail (a small JPEG beside the frames
folder, ``keys.frame_thumb_key``, which the storyboard reads instead of the PNG), the sidecar last. A frame
is done when its sidecar exists, records the same *recipe* (prompt, seed, model, image settings, style
embedding) and the PNG verifies against the size and sha256 the sidecar recorded. A renderer killed
before the sidecar leaves a PNG (and maybe a thumbnail) without sidecar, which the next run simply
renders again (to the same bytes); a done frame is skipped with its thumbnail, which is not written again.

Encoding is deterministic (fixed zlib level, no timestamps, text chunks in a fixed order), so the same
frame rendered twice is the same file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreamframe import keys, thumbnails
from dreamframe.errors import NotFound
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes

SIDECAR_SCHEMA = 1
PNG_COMPRESS_LEVEL = 6
SOFTWARE = "DreamFrame keyframe-renderer"


@dataclass(frozen=True)
class FrameRecipe:
    """Everything that decides a frame's pixels. Equal recipes → the same image."""

    index: int
    prompt: str
    seed: int
    model: str
    settings: dict[str, Any]
    style_token: str = ""
    style_embedding_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "model": self.model,
            "settings": dict(self.settings),
            "style": {"token": self.style_token, "embedding_sha256": self.style_embedding_sha256},
        }


@dataclass(frozen=True)
class StoredFrame:
    index: int
    seed: int
    image: ObjectRef
    sidecar: ObjectRef
    skipped: bool


def png_text(recipe: FrameRecipe) -> list[tuple[str, str]]:
    """PNG text chunks, in a fixed order (A1111-style readers look for "prompt"/"parameters")."""
    s = recipe.settings
    return [
        ("prompt", recipe.prompt),
        ("negative_prompt", str(s.get("negative_prompt", ""))),
        ("seed", str(recipe.seed)),
        ("model", recipe.model),
        ("steps", str(s.get("steps", ""))),
        ("frame_index", str(recipe.index)),
        ("style_token", recipe.style_token),
        ("dreamframe", json.dumps(recipe.as_dict(), sort_keys=True, ensure_ascii=False)),
        ("Software", SOFTWARE),
    ]


def encode_png(pixels: np.ndarray, text: list[tuple[str, str]]) -> bytes:
    """uint8 [H, W, 3] → PNG bytes, the same bytes every time for the same input."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text:
        info.add_text(key, value)  # tEXt when latin-1 suffices, else iTXt (UTF-8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(
        buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buffer.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(image.text)


def _ref_dict(ref: ObjectRef) -> dict[str, Any]:
    return {"bucket": ref.bucket, "key": ref.key, "size": ref.size, "sha256": ref.sha256}


def sidecar_document(
    recipe: FrameRecipe, image: ObjectRef, extra: dict[str, Any], thumbnail: ObjectRef | None = None
) -> dict[str, Any]:
    document = {
        "schema": SIDECAR_SCHEMA,
        "recipe": recipe.as_dict(),
        "image": _ref_dict(image),
        # How it was rendered (informational: not part of the recipe, so another GPU type still skips).
        "rendered_with": extra,
    }
    if thumbnail is not None:
        document["thumbnail"] = _ref_dict(thumbnail)
    return document


def write_frame(
    store: ObjectStore,
    *,
    job_id: str,
    story_index: int,
    recipe: FrameRecipe,
    pixels: np.ndarray,
    bucket: str | None,
    extra: dict[str, Any],
) -> StoredFrame:
    """PNG first, then its thumbnail, sidecar last (the sidecar's presence means the frame is complete)."""
    png = encode_png(pixels, png_text(recipe))
    image = store.put_bytes(
        keys.frame_key(job_id, story_index, recipe.index), png, content_type="image/png", bucket=bucket
    )
    thumbnail = store.put_bytes(
        keys.frame_thumb_key(job_id, story_index, recipe.index),
        thumbnails.thumbnail_from_pixels(pixels),
        content_type=thumbnails.CONTENT_TYPE,
        bucket=bucket,
    )
    document = sidecar_document(recipe, image, extra, thumbnail)
    data = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False).encode()
    sidecar = store.put_bytes(
        keys.frame_sidecar_key(job_id, story_index, recipe.index),
        data,
        content_type="application/json",
        bucket=bucket,
    )
    return StoredFrame(recipe.index, recipe.seed, image, sidecar, skipped=False)


def find_done(
    store: ObjectStore, *, job_id: str, story_index: int, recipe: FrameRecipe, bucket: str | None
) -> StoredFrame | None:
    """The stored frame if it is complete and was made from ``recipe``; else None (render it)."""
    sidecar_key = keys.frame_sidecar_key(job_id, story_index, recipe.index)
    try:
        data = store.get_bytes(sidecar_key, bucket=bucket)
    except NotFound:
        return None
    try:
        document = json.loads(data)
        if document.get("schema") != SIDECAR_SCHEMA or document.get("recipe") != recipe.as_dict():
            return None
        recorded = document["image"]
        image = ObjectRef(recorded["bucket"], recorded["key"], int(recorded["size"]), recorded["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable sidecar: render again
    if image.key != keys.frame_key(job_id, story_index, recipe.index) or not store.verify(image):
        return None
    sidecar = ObjectRef(bucket or store.default_bucket, sidecar_key, len(data), sha256_bytes(data))
    return StoredFrame(recipe.index, recipe.seed, image, sidecar, skipped=True)
