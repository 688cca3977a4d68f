"""Benchmark of style training: textual-inversion optimizer steps per second on this device.

    python -m services.style_trainer.bench --preset tiny          # CPU, seconds
    python -m services.style_trainer.bench --preset sdxl-random --compile \\
        --variants default,previous,eager-text   # GPU: real SDXL size, random weights
    python -m services.style_trainer.bench --preset sdxl --model-path /models/sdxl

It trains on synthetic images (generating style images is the renderer's work and is timed there) with
the reference setting (batch 1, accumulation 2, 768 px crops for SDXL) and reports, per variant of the
speed options (``--variants``; the model is built and the images encoded once for all of them):

- seconds per optimizer step and per forward/backward pass, steps/s, and the seconds spent before the
  timed steps (compiling, CUDA-graph recording);
- the reference schedule's estimate: 400 optimizer steps = 800 passes, plus the one-time VAE encoding;
- FLOPs per pass counted with ``torch.utils.flop_counter`` and the schedule's compute floor = its FLOPs ÷
  the TFLOP/s of a large GEMM measured in the same run, and how far the estimate is above that floor;
- MFU against a peak given on the command line (default: H100 SXM bf16 dense, 989 TFLOP/s);
- on GPUs: peak memory, host synchronisations per step (CUDA sync debug mode) and where they come from,
  and the GPU time per phase of a step (CUDA events between the phases: sampling, text encoders
  forward, UNet forward, UNet backward, text encoders backward, optimizer, between steps), over
  ``--phase-steps`` extra steps after the timed ones;
- on GPUs: the time the UNet's attention calls of one step take (forward and backward, at their real
  shapes) with each scaled-dot-product attention kernel, eagerly.

Prints one line per figure and, with ``--json PATH``, writes them all as JSON (after every variant, so an
interrupted run keeps what it measured). The top-level figures are the first variant's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import typer
from PIL import Image

from dreamframe import commandline
from dreamframe.benchmarking import (
    SyncCounter,
    default_gemm_size,
    matmul_flops_per_second,
    seconds_per_call,
    synchronize,
)
from dreamframe.models import sdxl

from .inversion import PhaseTimer, TextualInversion
from .options import REFERENCE_STEPS, TrainOptions

H100_BF16_DENSE_TFLOPS = 989.0
CompileMode = Literal["", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# name -> (what it is, TrainOptions changes on top of the defaults and the command line's).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the defaults", {}),
    "previous": (
        "the previous GPU setting: only the UNet compiled, losses read every step",
        {"compile_text_encoders": False, "loss_read_every": 1, "channels_last": False},
    ),
    "eager-text": ("the defaults, text encoders not compiled", {"compile_text_encoders": False}),
    "read-every-step": ("the defaults, losses read every step (one step late)", {"loss_read_every": 1}),
    "channels-last": ("the defaults, UNet channels-last", {"channels_last": True}),
    "contiguous": ("the defaults, UNet not channels-last", {"channels_last": False}),
    "no-batching": ("the defaults, accumulation passes one by one", {"batch_accumulation": False}),
    "cudnn-attention": ("the defaults, cuDNN attention (recompiles)", {"attention_backend": "cudnn"}),
    "flash-attention": ("the defaults, flash attention (recompiles)", {"attention_backend": "flash"}),
}


def load_pipelines(preset: str, device: str, model_path: str | None, cache_dir: Path) -> sdxl.SDXLPipelines:
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
        trainer._loss(10**9, compiled=False).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(
    pipes: sdxl.SDXLPipelines,
    trainer_latents: list,
    options: TrainOptions,
    *,
    warmup: int,
    measured: int,
    phase_steps: int,
) -> dict[str, Any]:
    """Train ``warmup`` untimed steps, ``measured`` timed ones, then ``phase_steps`` instrumented ones
    (CUDA events per phase, host syncs counted) in one run of ``TextualInversion.train``."""
    device = pipes.device
    trainer = TextualInversion(pipes, "Dramatic", options)
    trainer.latents = trainer_latents
    on_gpu = device.type == "cuda"
    phase_steps = phase_steps if on_gpu else 0
    syncs = SyncCounter(device)
    timer = PhaseTimer() if on_gpu else None
    marks: dict[str, float] = {}
    end = warmup + measured

    def should_stop() -> bool:
        # Called after every optimizer step; the syncs here fall between the timed ranges.
        if trainer.step == warmup:
            synchronize(device)
            marks["start"] = time.perf_counter()
        if trainer.step == end:
            synchronize(device)
            marks["end"] = time.perf_counter()
            if phase_steps:
                trainer.timer = timer
                syncs.__enter__()
        if phase_steps and trainer.step == end + phase_steps:
            syncs.__exit__(None, None, None)
            trainer.timer = None
        return False

    if on_gpu:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    reports = list(trainer.train(should_stop=should_stop))
    synchronize(device)
    elapsed = marks["end"] - marks["start"]
    per_step = elapsed / measured
    result: dict[str, Any] = {
        "warmup_seconds": marks["start"] - started,
        "seconds_per_step": per_step,
        "seconds_per_pass": per_step / options.gradient_accumulation_steps,
        "steps_per_second": 1 / per_step,
        "final_loss": reports[-1].loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
    }
    if phase_steps:
        phases = timer.seconds()
        result["phase_ms_per_step"] = {name: 1e3 * s / phase_steps for name, s in phases.items()}
        result["host_syncs_per_step"] = syncs.count / phase_steps
        result["host_sync_sites"] = syncs.sites
    return result


def compile_counters() -> dict[str, Any]:
    """Graph breaks, graphs compiled and CUDA-graph skips so far (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
        "graph_break_reasons": [str(reason)[:160] for reason in counters["graph_break"]][:5],
    }


def attention_shapes(config, latent_side: int) -> list[tuple[int, int, int, int]]:
    """(tokens, heads, head dim, transformer layers) per UNet level with attention (SDXL's layout:
    down blocks, the mid block at the lowest level, up blocks with one more layer each)."""
    levels = len(config.block_out_channels)

    def per_level(value):
        return list(value) if isinstance(value, list | tuple) else [value] * levels

    layers_per_block = per_level(config.layers_per_block)
    transformer_layers = per_level(config.transformer_layers_per_block)
    heads = per_level(config.num_attention_heads or config.attention_head_dim)
    shapes = []
    for i, block in enumerate(config.down_block_types):
        if "CrossAttn" not in block:
            continue
        count = transformer_layers[i] * (2 * layers_per_block[i] + 1)
        if i == levels - 1 and "CrossAttn" in (config.mid_block_type or ""):
            count += transformer_layers[i]
        channels = config.block_out_channels[i]
        shapes.append(((latent_side // 2**i) ** 2, heads[i], channels // heads[i], count))
    return shapes


def attention_timings(
    pipes: sdxl.SDXLPipelines, resolution: int, batch: int, repeats: int = 10
) -> dict[str, Any]:
    """Seconds per training step of the UNet's attention calls (self and cross attention of every
    transformer layer, forward and backward), eagerly, with each SDPA kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype = pipes.device, pipes.base.unet.dtype
    side = resolution // pipes.base.vae_scale_factor
    text = pipes.base.tokenizer.model_max_length
    shapes = attention_shapes(pipes.base.unet.config, side)
    backends = {
        "auto": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    result: dict[str, Any] = {"shapes": [list(s) for s in shapes], "batch": batch}

    def seconds(tokens: int, keys: int, heads: int, dim: int) -> float:
        def make(length: int, grad: bool = True) -> torch.Tensor:
            shape = (batch, heads, length, dim)
            return torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)

        q, k, v, out_grad = make(tokens), make(keys), make(keys), make(tokens, grad=False)
        return seconds_per_call(
            lambda: F.scaled_dot_product_attention(q, k, v).backward(out_grad), device, repeats
        )

    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                result[f"{name}_seconds_per_step"] = sum(
                    count * seconds(tokens, keys, heads, dim)
                    for tokens, heads, dim, count in shapes
                    for keys in (tokens, text)  # self and cross attention
                )
        except RuntimeError as exc:  # a kernel that does not support these shapes or this GPU
            result[f"{name}_error"] = str(exc).splitlines()[0][:200]
    return result


def variant_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def run(args: BenchArgs) -> dict:
    torch.manual_seed(0)
    bench_started = time.perf_counter()
    started = time.perf_counter()
    pipes = load_pipelines(args.preset, args.device, args.model_path, Path(args.cache_dir))
    device = pipes.device
    build_seconds = time.perf_counter() - started
    warmup, measured = args.warmup, args.steps
    base_options = TrainOptions(
        max_train_steps=warmup + measured + (args.phase_steps if device.type == "cuda" else 0),
        resolution=args.resolution,
        gradient_accumulation_steps=args.accumulation,
        checkpoint_every=0,
        compile=bool(args.compile),
        compile_mode=args.compile or "reduce-overhead",
        gradient_checkpointing=args.gradient_checkpointing,
    )
    first = TextualInversion(pipes, "Dramatic", base_options)
    images = synthetic_images(args.images, first.resolution)
    synchronize(device)
    started = time.perf_counter()
    first.encode_images(images)
    synchronize(device)
    encode_seconds = time.perf_counter() - started

    flops = pass_flops(first)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm = matmul_flops_per_second(device, gemm_dtype, args.gemm_size) / 1e12
    reference_passes = REFERENCE_STEPS * 2
    schedule_flops = flops * reference_passes
    floor = schedule_flops / (gemm * 1e12)

    def figures(per_pass: float) -> dict[str, Any]:
        estimate = reference_passes * per_pass + encode_seconds
        achieved = flops / per_pass / 1e12
        return {
            "reference_estimate_seconds": estimate,
            "estimate_over_floor": estimate / floor if floor else None,
            "achieved_tflops": achieved,
            "mfu": achieved / args.peak_tflops,
        }

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": str(pipes.dtype).removeprefix("torch."),
        "autocast_bf16": first.autocast,
        "compile": args.compile,
        "resolution": first.resolution,
        "images": args.images,
        "cached_latents": len(first.latents),
        "accumulation": base_options.gradient_accumulation_steps,
        "build_seconds": build_seconds,
        "encode_seconds": encode_seconds,
        "flops_per_pass": flops,
        "reference_passes": reference_passes,
        "reference_schedule_flops": schedule_flops,
        "gemm_tflops": gemm,
        "compute_floor_seconds": floor,
        "peak_tflops": args.peak_tflops,
        "variants": [],
        "skipped_variants": [],
    }
    # Variants whose compiled graphs exist already cost only their steps; a new set of graphs costs about
    # what the slowest warm-up so far did.
    compiled_sets: set[tuple] = set()  # compiled graphs that exist
    slowest_warmup = 0.0
    for index, name in enumerate(variant_names(args.variants)):
        description, changes = VARIANTS[name]
        options = dataclasses.replace(base_options, **changes)
        text = options.compile if options.compile_text_encoders is None else options.compile_text_encoders
        graphs = set()  # the compiled graphs this variant runs: the UNet's per layout, the text encoders'
        if options.compile:
            layout = device.type == "cuda" if options.channels_last is None else options.channels_last
            graphs.add(("unet", layout, options.attention_backend))
        if text:
            graphs.add(("text", options.attention_backend))
        fresh = bool(graphs - compiled_sets)
        spent = time.perf_counter() - bench_started
        if index and args.time_budget and fresh and spent + slowest_warmup > args.time_budget:
            result["skipped_variants"].append(
                {"name": name, "why": f"{spent:.0f} s spent + ~{slowest_warmup:.0f} s to compile > budget"}
            )
            continue
        if graphs and any(kept[-1] != options.attention_backend for kept in compiled_sets):
            torch._dynamo.reset()  # compiled graphs keep the attention kernels they were traced with
            compiled_sets.clear()
        before = compile_counters()
        figures_of = measure(
            pipes,
            first.latents,
            options,
            warmup=warmup,
            measured=measured,
            phase_steps=args.phase_steps,
        )
        after = compile_counters()
        figures_of["compiled"] = {
            key: after[key] - before[key] for key in ("graphs", "graph_breaks", "cudagraph_skips")
        }
        figures_of["compiled"]["graph_break_reasons"] = after["graph_break_reasons"]
        compiled_sets |= graphs
        if fresh:
            slowest_warmup = max(slowest_warmup, figures_of["warmup_seconds"])
        entry = {"name": name, "description": description, "changes": changes, **figures_of}
        entry.update(figures(entry["seconds_per_pass"]))
        result["variants"].append(entry)
        if len(result["variants"]) == 1:
            result["variant"] = name
            result.update({k: v for k, v in entry.items() if k not in ("name", "description", "changes")})
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    if device.type == "cuda" and args.attention:  # last: a kernel that fails takes nothing else with it
        batch = base_options.batch_size * base_options.gradient_accumulation_steps
        result["attention"] = attention_timings(pipes, first.resolution, batch)
    result["bench_seconds"] = time.perf_counter() - bench_started
    return result


def describe(r: dict) -> list[str]:
    lines = [
        f"device              {r['device']}  torch {r['torch']}  preset={r['preset']} dtype={r['dtype']} "
        f"autocast_bf16={r['autocast_bf16']} compile={r['compile']}",
        f"images              {r['images']} (+ mirrors) = {r['cached_latents']} latents at "
        f"{r['resolution']} px, VAE-encoded once in {r['encode_seconds']:.3f} s",
        f"first variant       {r.get('variant')}",
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
    lines.append("variant              ms/pass  schedule  × floor  TFLOP/s  warm-up  syncs/step  loss")
    for v in r["variants"]:
        syncs = v.get("host_syncs_per_step")
        lines.append(
            f"  {v['name']:<18} {v['seconds_per_pass'] * 1e3:8.2f} {v['reference_estimate_seconds']:8.1f} s "
            f"{v['estimate_over_floor']:7.2f} {v['achieved_tflops']:8.1f} {v['warmup_seconds']:7.1f} s "
            f"{'-' if syncs is None else f'{syncs:10.2f}'}  {v['final_loss']:.5f}"
        )
        if "phase_ms_per_step" in v:
            phases = ", ".join(f"{k} {ms:.2f}" for k, ms in v["phase_ms_per_step"].items())
            lines.append(f"    GPU ms per step: {phases}")
        if v["compiled"]["graphs"] or v["compiled"]["graph_breaks"] or v["compiled"]["cudagraph_skips"]:
            lines.append(f"    compiled: {v['compiled']}")
        if v.get("host_sync_sites"):
            lines.append(f"    sync sites: {v['host_sync_sites']}")
    for skipped in r["skipped_variants"]:
        lines.append(f"  {skipped['name']:<18} skipped: {skipped['why']}")
    if "attention" in r:
        att = r["attention"]
        kernels = ", ".join(
            f"{k.removesuffix('_seconds_per_step')} {v * 1e3:.2f} ms"
            for k, v in att.items()
            if k.endswith("_seconds_per_step")
        )
        errors = {k: v for k, v in att.items() if k.endswith("_error")}
        lines.append(f"attention per step  (eager, fwd+bwd, batch {att['batch']}): {kernels} {errors or ''}")
    return lines


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    """The command line's choices (see ``bench`` for each one's meaning)."""

    preset: str
    device: str
    model_path: str | None
    cache_dir: str
    steps: int
    warmup: int
    phase_steps: int
    images: int
    resolution: int | None
    accumulation: int
    compile: str
    variants: str
    time_budget: float
    attention: bool
    gradient_checkpointing: bool
    gemm_size: int
    peak_tflops: float
    json: Path | None


app = typer.Typer(add_completion=False)


@app.command(help=__doc__.split("\n\n")[0])
def bench(
    preset: Annotated[
        str, typer.Option(help=f"tiny, {sdxl.SDXL_RANDOM} or sdxl (default: tiny)")
    ] = sdxl.TINY,
    device: Annotated[str, typer.Option()] = "auto",
    model_path: Annotated[str | None, typer.Option(help="folder holding base/ (for --preset sdxl)")] = None,
    cache_dir: Annotated[str, typer.Option()] = ".dreamframe/models",
    steps: Annotated[int, typer.Option(min=1, help="timed optimizer steps")] = 10,
    warmup: Annotated[int, typer.Option(min=1, help="untimed optimizer steps first")] = 3,
    phase_steps: Annotated[int, typer.Option(help="GPU: steps after the timed ones with phase timing")] = 5,
    images: Annotated[int, typer.Option(help="synthetic style images (the paper used 10)")] = 10,
    resolution: Annotated[int | None, typer.Option(help="crop side (default 768, or the model's)")] = None,
    accumulation: Annotated[int, typer.Option()] = 2,
    compile: Annotated[
        CompileMode,
        typer.Option(
            metavar="[MODE]", help="torch.compile (mode; bare --compile: reduce-overhead, CUDA graphs)"
        ),
    ] = "",
    variants: Annotated[
        str, typer.Option(help=f"comma-separated, measured in this order: {', '.join(VARIANTS)}")
    ] = "default",
    time_budget: Annotated[
        float,
        typer.Option(
            help="seconds: skip a later variant that needs new compiled graphs when they would not fit"
        ),
    ] = 0,
    no_attention: Annotated[
        bool, typer.Option("--no-attention", help="skip the attention kernel timings")
    ] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    gemm_size: Annotated[
        int | None, typer.Option(help="GEMM side for the floor (8192 GPU, 1024 CPU)")
    ] = None,
    peak_tflops: Annotated[float, typer.Option(help="for MFU")] = H100_BF16_DENSE_TFLOPS,
    json: Annotated[Path | None, typer.Option(help="also write the figures here")] = None,
) -> BenchArgs:
    variant_names(variants)
    return BenchArgs(
        preset=preset,
        device=device,
        model_path=model_path,
        cache_dir=cache_dir,
        steps=steps,
        warmup=warmup,
        phase_steps=phase_steps,
        images=images,
        resolution=resolution,
        accumulation=accumulation,
        compile=compile,
        variants=variants,
        time_budget=time_budget,
        attention=not no_attention,
        gradient_checkpointing=gradient_checkpointing,
        gemm_size=gemm_size if gemm_size is not None else default_gemm_size(sdxl.pick_device(device)),
        peak_tflops=peak_tflops,
        json=json,
    )


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    """The command line (default: the process's); ``--help``, usage errors and unknown variants exit."""
    return commandline.run(app, commandline.bare_option(argv, "--compile", "reduce-overhead"))


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
