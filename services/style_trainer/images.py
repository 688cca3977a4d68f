"""Style images: generated with SDXL base from the style description, or supplied by the user.

Generated images are stored under ``<style prefix>images/<params hash>/NNN.png``: the key depends on
everything that shapes the pixels (prompt, seed, steps, size, model), so a rerun with the same request
finds and reuses them (and an interrupted run makes only the missing ones), while a changed request
writes new keys and never overwrites older images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamframe.errors import InvalidArgument, NotFound
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes

from .options import ImageOptions


@dataclass(frozen=True)
class StyleImage:
    image: Image.Image  # RGB
    ref: ObjectRef


def decode_image(data: bytes, *, field: str, min_size: int) -> Image.Image:
    """Decode to RGB, or InvalidArgument naming ``field`` (undecodable, or smaller than ``min_size``)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"is not a decodable image ({exc})", field=field) from exc
    if min(image.size) < min_size:
        raise InvalidArgument(
            f"is {image.width}×{image.height}; style images need at least {min_size} px on the short side",
            field=field,
        )
    return image


def load_style_images(
    store: ObjectStore, refs: Sequence[ObjectRef], *, min_size: int, field: str = "style_images"
) -> list[StyleImage]:
    """Read and validate user-supplied images; the first bad one is named (``style_images.3``)."""
    if not refs:
        raise InvalidArgument("no style images given", field=field)
    images = []
    for i, ref in enumerate(refs):
        item = f"{field}.{i}"
        try:
            data = store.get_bytes(ref.key, bucket=ref.bucket or None)
        except NotFound as exc:
            raise NotFound(f"no object {ref.key!r}", field=item) from exc
        except InvalidArgument as exc:
            raise InvalidArgument(exc.message, field=item) from exc
        if ref.sha256 and sha256_bytes(data) != ref.sha256:
            raise InvalidArgument(f"object {ref.key!r} does not match the given sha256", field=item)
        image = decode_image(data, field=item, min_size=min_size)
        stored = ObjectRef(ref.bucket or store.default_bucket, ref.key, len(data), sha256_bytes(data))
        images.append(StyleImage(image, stored))
    return images


def generation_prompts(description: str, locations: Sequence[str], count: int) -> list[str]:
    """One prompt per image: the style description, over the story's locations in turn (variety of
    content, one look), or the description alone when there are none."""
    description = description.strip()
    if not locations:
        return [description] * count
    return [f"{description}, {locations[i % len(locations)]}" for i in range(count)]


def generation_key_prefix(
    style_prefix: str, prompts: Sequence[str], options: ImageOptions, model: str
) -> str:
    params = {
        "prompts": list(prompts),
        "steps": options.steps,
        "size": options.size,
        "guidance_scale": options.guidance_scale,
        "seed": options.seed,
        "model": model,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f"{style_prefix}images/{digest}/"


def generate_style_images(
    pipe,
    store: ObjectStore,
    *,
    prompts: Sequence[str],
    options: ImageOptions,
    size: int,
    key_prefix: str,
) -> Iterator[tuple[int, StyleImage]]:
    """Make (or reuse) one PNG per prompt with SDXL base, yielding ``(index, image)`` as each is ready
    (stored ones first). Batched; each image has its own generator seeded ``options.seed + i``, so an
    image never depends on which batch it was made in."""
    keys = [f"{key_prefix}{i:03d}.png" for i in range(len(prompts))]
    missing = []
    for i, key in enumerate(keys):
        stored = _stored_image(store, key)
        if stored is None:
            missing.append(i)
        else:
            yield i, stored
    device = pipe.unet.device
    for start in range(0, len(missing), options.batch_size):
        batch = missing[start : start + options.batch_size]
        generators = [torch.Generator(device=device).manual_seed(options.seed + i) for i in batch]
        with torch.no_grad():
            images = pipe(
                prompt=[prompts[i] for i in batch],
                height=size,
                width=size,
                num_inference_steps=options.steps,
                guidance_scale=options.guidance_scale,
                generator=generators,
            ).images
        for i, image in zip(batch, images, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            ref = store.put_bytes(keys[i], buffer.getvalue(), content_type="image/png")
            yield i, StyleImage(image.convert("RGB"), ref)


def _stored_image(store: ObjectStore, key: str) -> StyleImage | None:
    """An image a previous run stored (writes are atomic, so it is whole), or None."""
    if not store.exists(key):
        return None
    try:
        data = store.get_bytes(key)
        image = decode_image(data, field=key, min_size=1)
    except (InvalidArgument, NotFound):
        return None  # unreadable leftovers are made again
    return StyleImage(image, ObjectRef(store.default_bucket, key, len(data), sha256_bytes(data)))


def training_pixels(image: Image.Image, resolution: int, *, mirror: bool = False) -> torch.Tensor:
    """[3, H, W] in [-1, 1]: the short side scaled to ``resolution`` (Lanczos), the long side to a
    multiple of 8 (so crops fall on whole latent cells), optionally mirrored left-right."""
    if mirror:
        image = ImageOps.mirror(image)
    scale = resolution / min(image.size)
    width = max(resolution, int(round(image.width * scale / 8)) * 8)
    height = max(resolution, int(round(image.height * scale / 8)) * 8)
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
