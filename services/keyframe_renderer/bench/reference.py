"""The models, and the reference setting as the paper runs it: diffusers' pipelines, text prompts, one
image per call, fp16 (fp32 on a CPU), eager (or both UNets under ``torch.compile``), a PNG saved per frame."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dreamframe.benchmarking import synchronize
from dreamframe.config import get_settings
from dreamframe.models import sdxl

from ..options import DEFAULT_NEGATIVE_PROMPT
from .common import PROMPTS, note


def build_pipes(preset: str, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> sdxl.SDXLPipelines:
    settings = get_settings().renderer
    return sdxl.load_sdxl(
        preset, model_paths=settings.model_paths, cache_dir=cache_dir, device=str(device), dtype=dtype
    )


def cast(pipes: sdxl.SDXLPipelines, dtype: torch.dtype) -> sdxl.SDXLPipelines:
    """The same weights in another precision, in place (the refiner shares text_encoder_2 and VAE)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" is noise here
    try:
        pipes.base.to(dtype=dtype)
        if pipes.refiner is not None:
            pipes.refiner.unet.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    return sdxl.SDXLPipelines(pipes.base, pipes.refiner, pipes.preset, pipes.resolution, pipes.device, dtype)


def reference_frame(
    pipes: sdxl.SDXLPipelines, i: int, *, steps: int, size: int, fraction: float, out_dir: Path
) -> None:
    """Frame ``i`` as the paper renders it: text prompts into both pipelines, the PNG saved."""
    prompt = f"generate an image in Dramatic style: {PROMPTS[i % len(PROMPTS)]}"
    generator = torch.Generator(device=pipes.device).manual_seed(20 + i)
    latents = pipes.base(
        prompt=prompt,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps=steps,
        denoising_end=fraction,
        height=size,
        width=size,
        output_type="latent",
        generator=generator,
    ).images
    image = pipes.refiner(
        prompt=prompt,
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps=steps,
        denoising_start=fraction,
        image=latents,
        generator=generator,
    ).images[0]
    image.save(out_dir / f"{i}.png")


def run_reference(
    pipes: sdxl.SDXLPipelines, *, frames: int, steps: int, size: int, fraction: float, out_dir: Path
) -> dict[str, Any]:
    """The paper's loop: one frame per call, after one untimed warm-up frame."""
    from diffusers.utils import logging as diffusers_logging

    def one(i: int) -> None:
        reference_frame(pipes, i, steps=steps, size=size, fraction=fraction, out_dir=out_dir)

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 VAE's upcast logs a line per frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random fp16 weights overflow to NaN: harmless for timing
        one(0)  # warm-up (kernel selection, allocator)
        synchronize(pipes.device)
        started = time.perf_counter()
        for i in range(1, frames + 1):
            one(i)
        synchronize(pipes.device)
        seconds = time.perf_counter() - started
    diffusers_logging.set_verbosity(level)
    return {"images": frames, "seconds": seconds, "seconds_per_image": seconds / frames, "batch_size": 1}


def set_reference_compiled(pipes: sdxl.SDXLPipelines, mode: str) -> None:
    """torch.compile both pipelines' UNets as diffusers' docs do (``mode=""``: back to eager)."""
    for pipe in (pipes.base, pipes.refiner):
        if pipe is None:
            continue
        if mode:
            pipe.unet.compile(mode=mode, fullgraph=True)
        else:
            pipe.unet._compiled_call_impl = None
    if not mode:
        torch._dynamo.reset()


def time_references(
    pipes: sdxl.SDXLPipelines, *, frames: int, steps: int, size: int, fraction: float, compile_mode: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(eager, compiled) reference figures: ``frames`` timed frames each; the compiled loop only with a
    ``compile_mode``, and neither for ``frames`` 0. The UNets are eager again afterwards."""
    if frames <= 0:
        return None, None
    loop = dict(frames=frames, steps=steps, size=size, fraction=fraction)
    compiled = None
    with tempfile.TemporaryDirectory(prefix="render-ref-") as tmp:
        eager = run_reference(pipes, out_dir=Path(tmp), **loop)
        note(f"reference (eager): {eager['seconds_per_image']:.3f} s/image")
        if compile_mode:
            set_reference_compiled(pipes, compile_mode)
            try:
                compiled = run_reference(pipes, out_dir=Path(tmp), **loop)
                compiled["compile"] = compile_mode
                note(f"reference (compiled): {compiled['seconds_per_image']:.3f} s/image")
            finally:
                set_reference_compiled(pipes, "")
    return eager, compiled
