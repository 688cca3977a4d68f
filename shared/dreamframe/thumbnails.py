"""Keyframe thumbnails: a small JPEG of each frame (longest side ``THUMB_SIZE``), written by the renderer
beside the frame (``keys.frame_thumb_key``) and read by the storyboard instead of the full PNG.

Deterministic: the same pixels give the same bytes (fixed size, quality and subsampling, no metadata),
so a frame rendered again, or a thumbnail made again from a stored PNG, is the same object.
Pillow is imported where it is used: this module is importable from the base install.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

THUMB_SIZE = 192
JPEG_QUALITY = 80
CONTENT_TYPE = "image/jpeg"
# A stored frame is hostile input: one larger than this is not decoded (a 4096×4096 frame is 16.8 M).
MAX_SOURCE_PIXELS = 64 * 1024 * 1024


def fit(width: int, height: int, box: int) -> tuple[int, int]:
    """(width, height) scaled to fit a ``box``×``box`` square, aspect kept, never up-scaled."""
    scale = min(1.0, box / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(image: Image, *, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buffer.getvalue()


def thumbnail(image: Image, *, size: int = THUMB_SIZE) -> bytes:
    """A PIL image → the thumbnail's JPEG bytes."""
    from PIL import Image as PILImage

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    target = fit(*rgb.size, size)
    if target != rgb.size:
        rgb = rgb.resize(target, PILImage.Resampling.LANCZOS)
    return encode_jpeg(rgb)


def thumbnail_from_pixels(pixels: Any, *, size: int = THUMB_SIZE) -> bytes:
    """uint8 [H, W, 3] (the renderer's frame) → the thumbnail's JPEG bytes."""
    from PIL import Image as PILImage

    return thumbnail(PILImage.fromarray(pixels), size=size)


def thumbnail_from_image_bytes(data: bytes, *, size: int = THUMB_SIZE) -> bytes:
    """A stored frame (PNG) → the thumbnail's JPEG bytes; ValueError when it is not a readable image of
    a bounded size."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                raise ValueError(f"image of {image.width}×{image.height} is too large for a thumbnail")
            image.load()
            return thumbnail(image, size=size)
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
