"""Training and image options, with the reference's values as defaults, and their validation.

The reference (DreamFrame's StyleImmobilization) trains 400 optimizer steps in eight stages of
4, 8, 13, 20, 35, 60, 100, 160 steps whose learning rates fall linearly from 1e-3 to 3e-4, with
gradient accumulation 2 (800 forward/backward passes), batch 1, AdamW (weight decay 1e-2), gradient
clipping 1.0, 768×768 images plus their mirror images, and prompts "generate an image in {} style"
(and four more) with a random variation word from {painting, acryl, art, picture}.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Literal

from dreamframe.errors import InvalidArgument
from dreamframe.models import attention

# (optimizer steps, learning rate) per stage; lrs are linear from 1e-3 down to 3e-4 in 8 stages.
REFERENCE_LR_STAGES: tuple[tuple[int, float], ...] = (
    (4, 1e-3),
    (8, 9e-4),
    (13, 8e-4),
    (20, 7e-4),
    (35, 6e-4),
    (60, 5e-4),
    (100, 4e-4),
    (160, 3e-4),
)
REFERENCE_STEPS = sum(n for n, _ in REFERENCE_LR_STAGES)  # 400
REFERENCE_RESOLUTION = 768

# "{}" takes "<token> <variation>". The first is the reference's; the others are ours.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "generate an image in {} style",
    "a scene painted in {} style",
    "an illustration of a place in {} style",
    "a frame of a story told in {} style",
    "people and places rendered in {} style",
)
PROMPT_VARIATIONS: tuple[str, ...] = ("painting", "acryl", "art", "picture")

ATTENTION_BACKENDS = attention.BACKENDS
MAX_TRAIN_STEPS = 10_000
MAX_STYLE_IMAGES = 200


@dataclass(frozen=True)
class TrainOptions:
    """Textual inversion. ``resolution=None`` means the reference 768, or the model's own size if smaller
    (64 for the tiny preset)."""

    max_train_steps: int = REFERENCE_STEPS
    gradient_accumulation_steps: int = 2
    batch_size: int = 1
    resolution: int | None = None
    # Train on horizontally mirrored copies of every image as well (the reference does).
    mirror: bool = True
    lr_stages: tuple[tuple[int, float], ...] = REFERENCE_LR_STAGES
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # New rows start as randn × init_scale (the reference's "randn_like" start).
    init_scale: float = 0.01
    templates: tuple[str, ...] = PROMPT_TEMPLATES
    variations: tuple[str, ...] = PROMPT_VARIATIONS
    # DDPM noise schedule used for the loss.
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # "auto": bf16 autocast on GPUs, fp32 on CPUs.
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    gradient_checkpointing: bool = False
    # torch.compile the UNet for the training loop (GPU; the first request in a process pays the
    # compile, minutes). "reduce-overhead" adds CUDA graphs: batch-1 SDXL passes are launch-bound, and
    # on an H200 it took a pass from 183 ms (eager) and 166 ms (compile "default") to 72 ms.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "reduce-overhead"
    )
    # Compile the two text encoders as well (they run forward and backward every step: hundreds of small
    # kernels, launch-bound when eager; with "reduce-overhead" CUDA graphs cover them). Once per process
    # and model, like the UNet's. None: whenever ``compile`` is on.
    compile_text_encoders: bool | None = None
    # Run a step's accumulation passes as one batch (same samples, same gradient up to rounding): half
    # the kernel launches for these launch-bound passes. None: on GPUs, off on CPUs.
    batch_accumulation: bool | None = None
    # The UNet's weights in channels-last memory format (the layout bf16 tensor-core convolutions run in;
    # values unchanged, the loaded pipeline's UNet is converted in place). Off until measured a win for
    # compiled training (the bench's "channels-last" variant); None: on GPUs.
    channels_last: bool | None = False
    # Read the losses to the host once per this many optimizer steps (one host sync for all of them, one
    # step late so the GPU never waits); every step is still reported, the reports arrive in bunches.
    # Steps that are multiples of checkpoint_every are always reported at once. None: 10 on GPUs, 1 else.
    loss_read_every: int | None = None
    # Scaled-dot-product attention kernels: "auto" is PyTorch's choice; a compiled model keeps the kernels
    # it was compiled with.
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    seed: int = 0
    # Save a resumable checkpoint to storage every N optimizer steps (0: never).
    checkpoint_every: int = 50

    @property
    def total_passes(self) -> int:
        """Forward/backward passes: optimizer steps × accumulation (reference: 800)."""
        return self.max_train_steps * self.gradient_accumulation_steps

    def fingerprint_fields(self) -> dict:
        """Everything that changes the result (not checkpoint_every, which only changes resumability)."""
        fields = asdict(self)
        for name in (
            "checkpoint_every",
            "compile",
            "compile_mode",
            "compile_text_encoders",
            "gradient_checkpointing",
            "batch_accumulation",
            "channels_last",
            "loss_read_every",
            "attention_backend",
        ):
            fields.pop(name)
        return fields


@dataclass(frozen=True)
class ImageOptions:
    """Style images generated from the description with SDXL base."""

    num_images: int = 20
    steps: int = 40
    # None: the model's native size (1024 for SDXL, 64 for tiny).
    size: int | None = None
    guidance_scale: float = 5.0
    batch_size: int = 4
    seed: int = 0
    # User-supplied images smaller than this on their short side are rejected (None: half the
    # training resolution).
    min_size: int | None = None


@dataclass(frozen=True)
class StyleOptions:
    preset: str = ""
    train: TrainOptions = field(default_factory=TrainOptions)
    images: ImageOptions = field(default_factory=ImageOptions)


def stage_ends(stages: tuple[tuple[int, float], ...], total_steps: int) -> list[int]:
    """Cumulative stage ends scaled to ``total_steps`` (exactly the stages when it equals their sum)."""
    planned = sum(n for n, _ in stages)
    ends, running = [], 0
    for n, _ in stages:
        running += n
        ends.append(round(running * total_steps / planned))
    ends[-1] = total_steps
    return ends


def learning_rate(step: int, total_steps: int, stages: tuple[tuple[int, float], ...]) -> float:
    """The learning rate of 0-based optimizer step ``step`` under the stepped schedule."""
    ends = stage_ends(stages, total_steps)
    index = bisect.bisect_right(ends, step)
    return stages[min(index, len(stages) - 1)][1]


def _require(condition: bool, message: str, field_name: str) -> None:
    if not condition:
        raise InvalidArgument(message, field=field_name)


def validate_train(options: TrainOptions, *, prefix: str = "options") -> TrainOptions:
    o = options
    _require(
        1 <= o.max_train_steps <= MAX_TRAIN_STEPS,
        f"must be in 1..{MAX_TRAIN_STEPS}",
        f"{prefix}.max_train_steps",
    )
    _require(
        1 <= o.gradient_accumulation_steps <= 64, "must be in 1..64", f"{prefix}.gradient_accumulation_steps"
    )
    _require(1 <= o.batch_size <= 64, "must be in 1..64", f"{prefix}.batch_size")
    if o.resolution is not None:
        _require(
            64 <= o.resolution <= 2048 and o.resolution % 8 == 0,
            "must be a multiple of 8 in 64..2048",
            f"{prefix}.resolution",
        )
    _require(len(o.lr_stages) > 0, "needs at least one stage", f"{prefix}.lr_stages")
    for i, (n, lr) in enumerate(o.lr_stages):
        _require(n > 0 and 0 < lr < 1, "each stage needs steps > 0 and 0 < lr < 1", f"{prefix}.lr_stages.{i}")
    _require(0 <= o.weight_decay < 1, "must be in [0, 1)", f"{prefix}.weight_decay")
    _require(o.max_grad_norm > 0, "must be > 0", f"{prefix}.max_grad_norm")
    _require(0 < o.init_scale <= 1, "must be in (0, 1]", f"{prefix}.init_scale")
    _require(len(o.templates) > 0, "needs at least one template", f"{prefix}.templates")
    for i, template in enumerate(o.templates):
        _require(template.count("{}") == 1, "must contain '{}' exactly once", f"{prefix}.templates.{i}")
    _require(
        o.mixed_precision in ("auto", "bf16", "no"), "must be auto, bf16 or no", f"{prefix}.mixed_precision"
    )
    _require(o.checkpoint_every >= 0, "must be >= 0", f"{prefix}.checkpoint_every")
    _require(o.num_train_timesteps >= 1, "must be >= 1", f"{prefix}.num_train_timesteps")
    if o.loss_read_every is not None:
        _require(1 <= o.loss_read_every <= 1000, "must be in 1..1000", f"{prefix}.loss_read_every")
    _require(
        o.attention_backend in ATTENTION_BACKENDS,
        f"must be one of {', '.join(ATTENTION_BACKENDS)}",
        f"{prefix}.attention_backend",
    )
    return o


def validate_images(options: ImageOptions, *, prefix: str = "options") -> ImageOptions:
    o = options
    _require(
        1 <= o.num_images <= MAX_STYLE_IMAGES,
        f"must be in 1..{MAX_STYLE_IMAGES}",
        f"{prefix}.num_style_images",
    )
    _require(1 <= o.steps <= 500, "must be in 1..500", f"{prefix}.image_steps")
    if o.size is not None:
        _require(
            64 <= o.size <= 2048 and o.size % 8 == 0,
            "must be a multiple of 8 in 64..2048",
            f"{prefix}.image_size",
        )
    _require(1 <= o.batch_size <= 64, "must be in 1..64", f"{prefix}.image_batch_size")
    _require(o.guidance_scale >= 0, "must be >= 0", f"{prefix}.guidance_scale")
    if o.min_size is not None:
        _require(o.min_size >= 1, "must be >= 1", f"{prefix}.min_image_size")
    return o


def resolve_resolution(options: TrainOptions, model_resolution: int) -> int:
    """Training crop side: the option, else the reference 768, capped at the model's native size."""
    return options.resolution or min(REFERENCE_RESOLUTION, model_resolution)
