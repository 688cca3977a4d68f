"""CLIP-style image encoder presets (the evaluator's style-consistency metric).

- ``tiny``: ``CLIPVisionModelWithProjection`` with a very small random config and a PIL-only
  ``CLIPImageProcessorPil`` (no torchvision). Built once from a fixed seed, saved with
  ``save_pretrained`` into the model cache and loaded back by path, so it goes through exactly the
  loading code a real checkpoint does.
- ``clip-vit-large-patch14-random``: ViT-L/14's vision tower with seeded random weights, written once
  into the model cache (``dreamframe.models.snapshots``) and loaded by path.
- anything else: a local path or hub id of a CLIP vision checkpoint (e.g. ``openai/clip-vit-large-patch14``);
  a full ``CLIPModel`` checkpoint works too (its vision tower and visual projection are loaded).

``ImageEncoder.embed`` returns L2-normalised embeddings, so a dot product is a cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamframe.errors import FailedPrecondition
from dreamframe.models import build_once
from dreamframe.models.device import pick_device
from dreamframe.models.snapshot_cache import CLIP_L_RANDOM, snapshot_dir

TINY = "tiny"
DEFAULT_REAL = "openai/clip-vit-large-patch14"
# Bump when the tiny config changes, so stale caches are rebuilt instead of reused.
TINY_VERSION = 1
TINY_SEED = 4321
TINY_IMAGE_SIZE = 32


@dataclass
class ImageEncoder:
    model: object  # CLIPVisionModelWithProjection
    processor: object  # CLIPImageProcessorPil
    name: str
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def embed(self, images: Sequence[object], *, batch_size: int = 32) -> torch.Tensor:
        """[N, D] float32 L2-normalised image embeddings (on CPU) for PIL images."""
        if not images:
            return torch.zeros(0, int(self.model.config.projection_dim))
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [img.convert("RGB") for img in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            out = self.model(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(torch.nn.functional.normalize(out.image_embeds.float(), dim=-1).cpu())
        return torch.cat(chunks)


def build_tiny_clip_vision(seed: int = TINY_SEED):
    """(model, processor): a tiny random CLIP vision tower + projection, fp32 on CPU."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return model, processor


def tiny_clip_vision_dir(cache_dir: Path) -> Path:
    """The tiny preset on disk, built on first use into a temp dir and renamed (race-safe)."""

    def build(tmp: Path) -> None:
        model, processor = build_tiny_clip_vision()
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return build_once(
        Path(cache_dir) / f"tiny-clip-vision-v{TINY_VERSION}",
        build,
        complete=lambda target: (target / "preprocessor_config.json").exists(),
        tmp_prefix=".tiny-clip-vision-",
    )


def load_clip_vision(
    name_or_path: str = TINY,
    *,
    cache_dir: Path = Path(".dreamframe/models"),
    device: str = "auto",
    dtype: torch.dtype | None = None,
    field: str = "image_encoder",
) -> ImageEncoder:
    """Load an image encoder: ``tiny`` (built into the cache once) or a path / hub id."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    location = name_or_path
    if name_or_path == TINY:
        location = str(tiny_clip_vision_dir(cache_dir))
    elif name_or_path == CLIP_L_RANDOM:
        location = str(snapshot_dir(CLIP_L_RANDOM, cache_dir))
    dev = pick_device(device)
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(location, dtype=dt)
        processor = CLIPImageProcessorPil.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot load image encoder {name_or_path!r}: {exc}", field=field) from exc
    model.to(dev).eval()
    return ImageEncoder(model, processor, name_or_path, dev, dt)


def vit_large_patch14_config(image_size: int = 224):
    """CLIP ViT-L/14's vision tower as openai/clip-vit-large-patch14 publishes it (24 layers of 1024,
    projection 768); ``image_size`` 336 is the -336 variant LLaVA-1.5 uses."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
