"""Render options and frame selection: the request's knobs, validated, with the reference's defaults.

Zero/empty request fields mean "the reference default" (as in the proto): 40 steps, base denoises to
0.75 then the refiner, guidance 5.0 (diffusers' SDXL default, which the reference kept), the long fixed
negative prompt, seed ``20 + frame index``, and the preset's native resolution (1024×1024 for SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dreamframe.errors import InvalidArgument

DEFAULT_STEPS = 40
DEFAULT_HIGH_NOISE_FRACTION = 0.75
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_SEED_OFFSET = 20
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_BATCH_SIZE = 64

# The reference keeps one long negative prompt fixed for every frame. CLIP reads at most 77 tokens, so
# the most damaging defects come first.
DEFAULT_NEGATIVE_PROMPT = (
    "ugly, deformed, disfigured, distorted face, bad anatomy, bad proportions, extra limbs, extra arms, "
    "extra legs, extra fingers, missing fingers, fused fingers, mutated hands, poorly drawn hands, poorly "
    "drawn face, poorly drawn feet, cloned face, duplicate, mutation, malformed limbs, long neck, "
    "cross-eyed, "
    "out of frame, cropped, cut off, body out of frame, blurry, out of focus, low resolution, low quality, "
    "worst quality, jpeg artifacts, grainy, noisy, pixelated, oversaturated, underexposed, overexposed, "
    "low contrast, watermark, signature, text, logo, username, frame, border, tiling, collage, split image, "
    "amateur, beginner, draft, sketch, cartoonish, 3d render, disturbing, gross"
)


@dataclass(frozen=True)
class RenderOptions:
    """The request's options as sent: zero/empty means the default (mirrors dreamframe.v1.RenderOptions)."""

    preset: str = ""
    steps: int = 0
    high_noise_fraction: float = 0.0
    width: int = 0
    height: int = 0
    guidance_scale: float = 0.0
    negative_prompt: str = ""
    seed_offset: int = 0
    batch_size: int = 0
    compile: bool = False
    disable_refiner: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class RenderParams:
    """Options with every default filled in and checked: what a render actually uses."""

    preset: str
    steps: int
    high_noise_fraction: float
    width: int
    height: int
    guidance_scale: float
    negative_prompt: str
    seed_offset: int
    # 0: choose from free memory when the batch is formed.
    batch_size: int
    compile: bool
    use_refiner: bool
    overwrite: bool

    def seed(self, frame_index: int) -> int:
        return self.seed_offset + frame_index

    def image_settings(self) -> dict[str, object]:
        """What determines a frame's pixels besides prompt, seed and model (batch size does not)."""
        return {
            "steps": self.steps,
            "high_noise_fraction": self.high_noise_fraction if self.use_refiner else None,
            "refiner": self.use_refiner,
            "width": self.width,
            "height": self.height,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
        }


def preset_of(options: RenderOptions, default_preset: str) -> str:
    return options.preset.strip() or default_preset


def validate_options(options: RenderOptions) -> None:
    """Checks that need no model (the side length default needs one: see ``resolve_options``)."""
    if options.steps < 0 or options.steps > MAX_STEPS:
        raise InvalidArgument(
            f"must be between 1 and {MAX_STEPS} (0 = {DEFAULT_STEPS})", field="options.steps"
        )
    if not 0.0 <= options.high_noise_fraction < 1.0:
        raise InvalidArgument(
            "must be in (0, 1): the share of the schedule the base model runs (0 = 0.75)",
            field="options.high_noise_fraction",
        )
    for name in ("width", "height"):
        side = getattr(options, name)
        if side < 0 or side > MAX_SIDE or side % 8:
            raise InvalidArgument(
                f"must be a positive multiple of 8 up to {MAX_SIDE} (0 = the model's resolution), got {side}",
                field=f"options.{name}",
            )
    if options.guidance_scale < 0:
        raise InvalidArgument(
            "must be >= 0 (0 = 5.0; <= 1 disables guidance)", field="options.guidance_scale"
        )
    if options.seed_offset < 0:
        raise InvalidArgument("must be >= 0 (0 = 20)", field="options.seed_offset")
    if options.batch_size < 0 or options.batch_size > MAX_BATCH_SIZE:
        raise InvalidArgument(
            f"must be between 0 and {MAX_BATCH_SIZE} (0 = chosen from free memory)",
            field="options.batch_size",
        )


def resolve_options(
    options: RenderOptions, *, preset: str, resolution: int, default_batch_size: int, compile_default: bool
) -> RenderParams:
    validate_options(options)
    return RenderParams(
        preset=preset,
        steps=options.steps or DEFAULT_STEPS,
        high_noise_fraction=options.high_noise_fraction or DEFAULT_HIGH_NOISE_FRACTION,
        width=options.width or resolution,
        height=options.height or resolution,
        guidance_scale=options.guidance_scale or DEFAULT_GUIDANCE_SCALE,
        negative_prompt=options.negative_prompt.strip() or DEFAULT_NEGATIVE_PROMPT,
        seed_offset=options.seed_offset or DEFAULT_SEED_OFFSET,
        batch_size=options.batch_size or default_batch_size,
        compile=options.compile or compile_default,
        use_refiner=not options.disable_refiner,
        overwrite=options.overwrite,
    )


@dataclass(frozen=True)
class FrameSelection:
    """Which frames to render (mirrors dreamframe.v1.FrameSelection; ``all`` when nothing is set)."""

    kind: Literal["all", "range", "list"] = "all"
    start: int = 0
    end: int = 0
    indices: tuple[int, ...] = field(default_factory=tuple)


def select_frames(selection: FrameSelection, frame_count: int) -> list[int]:
    """The frame indices, in request order; errors name the offending field (``frames.list.indices.3``)."""
    if frame_count == 0:
        raise InvalidArgument("the story has no frames", field="story")
    if selection.kind == "all":
        return list(range(frame_count))
    if selection.kind == "range":
        if not 0 <= selection.start < frame_count:
            raise InvalidArgument(
                f"{selection.start} is out of range: the story has frames 0..{frame_count - 1}",
                field="frames.range.start",
            )
        if not selection.start < selection.end <= frame_count:
            raise InvalidArgument(
                f"must be in ({selection.start}, {frame_count}] (end is exclusive), got {selection.end}",
                field="frames.range.end",
            )
        return list(range(selection.start, selection.end))
    if selection.kind == "list":
        if not selection.indices:
            raise InvalidArgument("must name at least one frame", field="frames.list.indices")
        seen: set[int] = set()
        for position, index in enumerate(selection.indices):
            where = f"frames.list.indices.{position}"
            if not 0 <= index < frame_count:
                raise InvalidArgument(
                    f"{index} is out of range: the story has frames 0..{frame_count - 1}", field=where
                )
            if index in seen:
                raise InvalidArgument(f"frame {index} is listed twice", field=where)
            seen.add(index)
        return list(selection.indices)
    raise InvalidArgument(f"unknown selection {selection.kind!r}", field="frames")
