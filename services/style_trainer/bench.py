"""Benchmark of style training: textual-inversion optimizer steps per second on this device.

    python -m services.style_trainer.bench --preset tiny          # CPU, seconds
    python -m services.style_trainer.bench --preset sdxl-random   # GPU: real SDXL size, random weights
    python -m services.style_trainer.bench --preset sdxl --model-path /models/sdxl

It trains on synthetic images (generating style images is the renderer's work and is timed there) with
the reference setting (batch 1, accumulation 2, 768 px crops for SDXL) and reports:

- seconds per optimizer step and per forward/backward pass, steps/s;
- the reference schedule's estimate: 400 optimizer steps = 800 passes, plus the one-time VAE encoding;
- FLOPs per pass counted with ``torch.utils.flop_counter`` and the schedule's compute floor = its FLOPs ÷
  the TFLOP/s of a large GEMM measured in the same run, and how far the estimate is above that floor;
- MFU against a peak given on the command line (default: H100 SXM bf16 dense, 989 TFLOP/s);
- peak GPU memory.

Prints one line per figure and, with ``--json PATH``, writes them all as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamframe.benchmarking import default_gemm_size, matmul_flops_per_second, synchronize
from dreamframe.models import sdxl
from dreamframe.models.sdxl_configs import RANDOM_PRESET, build_random_sdxl

from .inversion import TextualInversion
from .options import REFERENCE_STEPS, TrainOptions

H100_BF16_DENSE_TFLOPS = 989.0


def load_pipelines(preset: str, device: str, model_path: str | None, cache_dir: Path) -> sdxl.SDXLPipelines:
    if preset == RANDOM_PRESET:
        dev = sdxl.pick_device(device)
        return build_random_sdxl(dev, sdxl.pick_dtype(dev), with_refiner=False)
    paths = {preset: model_path} if model_path else {}
    return sdxl.load_sdxl(preset, model_paths=paths, cache_dir=cache_dir, device=device, with_refiner=False)


def synthetic_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random images (noise upsampled), closer to photographs than white noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        images.append(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return images


def pass_flops(trainer: TextualInversion) -> int:
    """FLOPs of one forward/backward pass (text encoders, UNet forward, input-gradient backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer._loss(10**9).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    pipes = load_pipelines(args.preset, args.device, args.model_path, Path(args.cache_dir))
    device = pipes.device
    build_seconds = time.perf_counter() - started
    warmup, measured = args.warmup, args.steps
    options = TrainOptions(
        max_train_steps=warmup + measured,
        resolution=args.resolution,
        gradient_accumulation_steps=args.accumulation,
        checkpoint_every=0,
        compile=bool(args.compile),
        compile_mode=args.compile or "reduce-overhead",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = TextualInversion(pipes, "Dramatic", options)
    images = synthetic_images(args.images, trainer.resolution)
    synchronize(device)
    started = time.perf_counter()
    trainer.encode_images(images)
    synchronize(device)
    encode_seconds = time.perf_counter() - started

    flops = pass_flops(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = trainer.train()
    for _ in range(warmup):
        next(steps)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(measured):
        report = next(steps)
    synchronize(device)
    elapsed = time.perf_counter() - started
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm = matmul_flops_per_second(device, gemm_dtype, args.gemm_size) / 1e12
    per_step = elapsed / measured
    per_pass = per_step / options.gradient_accumulation_steps
    reference_passes = REFERENCE_STEPS * 2
    schedule_flops = flops * reference_passes
    estimate = reference_passes * per_pass + encode_seconds
    floor = schedule_flops / (gemm * 1e12)
    achieved = flops / per_pass / 1e12
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "preset": args.preset,
        "dtype": str(pipes.dtype).removeprefix("torch."),
        "autocast_bf16": trainer.autocast,
        "compile": args.compile,
        "resolution": trainer.resolution,
        "images": args.images,
        "cached_latents": len(trainer.latents),
        "accumulation": options.gradient_accumulation_steps,
        "build_seconds": build_seconds,
        "encode_seconds": encode_seconds,
        "seconds_per_step": per_step,
        "seconds_per_pass": per_pass,
        "steps_per_second": 1 / per_step,
        "final_loss": report.loss,
        "flops_per_pass": flops,
        "reference_passes": reference_passes,
        "reference_schedule_flops": schedule_flops,
        "reference_estimate_seconds": estimate,
        "gemm_tflops": gemm,
        "compute_floor_seconds": floor,
        "estimate_over_floor": estimate / floor if floor else None,
        "achieved_tflops": achieved,
        "peak_tflops": args.peak_tflops,
        "mfu": achieved / args.peak_tflops,
        "peak_memory_gib": peak_memory,
    }


def describe(r: dict) -> list[str]:
    lines = [
        f"device              {r['device']}  preset={r['preset']} dtype={r['dtype']} "
        f"autocast_bf16={r['autocast_bf16']} compile={r['compile']}",
        f"images              {r['images']} (+ mirrors) = {r['cached_latents']} latents at "
        f"{r['resolution']} px, VAE-encoded once in {r['encode_seconds']:.3f} s",
        f"per optimizer step  {r['seconds_per_step'] * 1e3:.2f} ms = {r['accumulation']} passes × "
        f"{r['seconds_per_pass'] * 1e3:.2f} ms   ({r['steps_per_second']:.2f} steps/s)",
        f"FLOPs per pass      {r['flops_per_pass'] / 1e9:.3f} GFLOP, "
        f"achieved {r['achieved_tflops']:.3f} TFLOP/s",
        f"reference schedule  {r['reference_passes']} passes ≈ {r['reference_estimate_seconds']:.1f} s "
        f"({r['reference_schedule_flops'] / 1e12:.2f} TFLOP)",
        f"compute floor       {r['compute_floor_seconds']:.2f} s at the GEMM rate measured here "
        f"({r['gemm_tflops']:.2f} TFLOP/s): the estimate is {r['estimate_over_floor']:.2f}× the floor",
        f"MFU                 {r['mfu'] * 100:.3f} % of {r['peak_tflops']:.0f} TFLOP/s",
    ]
    if r["peak_memory_gib"] is not None:
        lines.append(f"peak GPU memory     {r['peak_memory_gib']:.2f} GiB")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=sdxl.TINY, help=f"tiny, {RANDOM_PRESET} or sdxl (default: tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-path", default=None, help="folder holding base/ (for --preset sdxl)")
    parser.add_argument("--cache-dir", default=".dreamframe/models")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--images", type=int, default=10, help="synthetic style images (the paper used 10)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="crop side (default 768, or the model's)"
    )
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="reduce-overhead",
        default="",
        choices=["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile the UNet (mode; bare --compile: reduce-overhead, CUDA graphs)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--gemm-size", type=int, default=None, help="GEMM side for the floor (8192 GPU, 1024 CPU)"
    )
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="for MFU")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.gemm_size is None:
        args.gemm_size = default_gemm_size(sdxl.pick_device(args.device))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    for line in describe(result):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
