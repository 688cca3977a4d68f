"""Keyframe-renderer benchmark: the reference setting vs the service's fast path(s) vs the compute floor.

    python -m services.keyframe_renderer.bench --out bench/            # GPU: full-size SDXL, random weights
    python -m services.keyframe_renderer.bench --preset tiny --out /tmp/b   # CPU smoke run in seconds

Measures, on the current device, in one run (the weights are built once):
- the reference setting as the paper runs it: diffusers' pipelines, text prompts, one image per call,
  fp16 (fp32 on a CPU), eager, PIL PNG saved per frame; ``--reference-compile`` also times the same loop
  with both UNets under ``torch.compile`` (for transparency; the speedups are against the eager one);
- the service, once per *variant* of the engine options (``--variant``; the defaults compare the
  service's defaults, last session's compiled setting and cuDNN attention): ``Renderer.render`` end to
  end (batched bf16 engine, PNG + sidecar writes into a LocalStore) at ``--batch-size`` (0 = chosen from
  free memory, as the service does), after one warm-up batch that pays any compile; device time per
  stage (text encoders, base, refiner, VAE decode) from CUDA events;
- FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real batch
  (per module: base UNet × its steps, refiner UNet × its steps, VAE decode, text encoders), and each
  module's eager device time over one batch;
- SDPA kernels (cuDNN, flash, memory-efficient, math) timed alone on the UNets' and the VAE's attention
  shapes, and the eager VAE decode channels-last vs contiguous;
- the compute floor: FLOPs per image ÷ the bf16 peak (``--peak-flops``, default the card's datasheet
  figure) and ÷ the matmul throughput this run measures on a large GEMM; model FLOPs utilisation;
- host synchronisations per batch (CUDA sync debug mode) and peak memory per image.

Prints a table and writes ``render-bench.json`` and ``render-bench.md`` under ``--out`` (rewritten after
every variant, so a run cut short keeps what it measured). ``--time-budget`` skips variants that would
not finish in time. Presets: ``sdxl-random`` (the real SDXL base + refiner + VAE architecture with random
weights, from dreamframe.models.sdxl_configs; no download), ``sdxl`` (real weights per the renderer
config), ``tiny``.

The parts: ``reference`` (the models, the paper's loop), ``service`` (``Renderer.render`` timed),
``measure`` (FLOPs and device time per module, FP8 precision, GEMM rate), ``kernels`` (attention, linear
and VAE-layout timings alone), ``variants`` (the engine-option variants compared) and ``summary`` (the
floor, MFU and speedups, the table and the report files); this module is the command line and the order
they run in.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer

from dreamframe import commandline
from dreamframe.config import get_settings
from dreamframe.models import sdxl
from dreamframe.storage import open_store

from ..engine import COMPILE_MODES, EngineOptions, SDXLEngine, model_id, renderer_compile_cache
from ..options import RenderOptions, resolve_options
from .common import note
from .kernels import time_attention, time_vae_layouts
from .measure import eager_flops, environment, fp8_precision, gemm_flops_per_second
from .reference import build_pipes, cast, time_references
from .summary import bf16_peak, floor_seconds_per_image, write_report
from .variants import GPU_VARIANTS, VARIANTS, parse_variant, run_variants

CompileMode = Literal[COMPILE_MODES]
ReferenceCompileMode = Literal[tuple(mode for mode in COMPILE_MODES if mode)]
VARIANT_HELP = (
    f"a service variant (repeatable), against the renderer settings: {', '.join(VARIANTS)}, or "
    "NAME=key:value,... over compile_mode, compile_vae, compile_tuning, compile_regional, compile_aot, "
    f"fuse_qkv, sdpa_backend, channels_last. Default: {', '.join(GPU_VARIANTS)} on GPUs, default on "
    "CPUs. The first one that runs is the headline 'service' figure."
)


@dataclass(frozen=True)
class BenchArgs:
    """The command line's choices (see ``bench`` for each one's meaning)."""

    preset: str | None
    device: str
    frames: int
    reference_frames: int
    reference_compile: str
    batch_size: int
    steps: int
    high_noise_fraction: float
    resolution: int
    compile: str | None
    variant: list[str]
    time_budget: float
    skip_kernels: bool
    peak_flops: float | None
    out: Path


app = typer.Typer(add_completion=False)


@app.command(help=__doc__.split("\n\n")[0])
def bench(
    preset: Annotated[
        str | None, typer.Option(help=f"{sdxl.SDXL_RANDOM} (GPU default), sdxl, or tiny (CPU default)")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    frames: Annotated[int, typer.Option(help="timed frames per service variant")] = 16,
    reference_frames: Annotated[int, typer.Option(help="timed frames in the reference run (0: skip)")] = 3,
    reference_compile: Annotated[
        ReferenceCompileMode | None,
        typer.Option(
            metavar="[MODE]",
            help="also time the reference loop with both UNets under torch.compile (in this mode, "
            "default 'default')",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="0 = from free memory, as the service chooses")] = 0,
    steps: Annotated[int, typer.Option()] = 40,
    high_noise_fraction: Annotated[float, typer.Option()] = 0.75,
    resolution: Annotated[int, typer.Option(help="0 = the preset's (1024 for SDXL)")] = 0,
    compile: Annotated[
        CompileMode | None,
        typer.Option(
            help="torch.compile mode of the service variants ('' = eager; default: 'default' on GPUs, "
            "eager on CPUs)"
        ),
    ] = None,
    variant: Annotated[
        list[str] | None, typer.Option(metavar="NAME[=key:value,...]", help=VARIANT_HELP)
    ] = None,
    time_budget: Annotated[
        float,
        typer.Option(
            help="seconds for the whole run: a variant that would not finish in time (judged by the last "
            "one's duration) is skipped (0 = no limit)"
        ),
    ] = 0.0,
    skip_kernels: Annotated[
        bool, typer.Option("--skip-kernels", help="skip the SDPA and VAE-layout timings")
    ] = False,
    peak_flops: Annotated[
        float | None,
        typer.Option(
            help="bf16 dense peak (default: the card's datasheet figure, H100 SXM 989e12 where unknown)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option()] = Path("bench"),
) -> BenchArgs:
    return BenchArgs(
        preset=preset,
        device=device,
        frames=frames,
        reference_frames=reference_frames,
        reference_compile=reference_compile or "",
        batch_size=batch_size,
        steps=steps,
        high_noise_fraction=high_noise_fraction,
        resolution=resolution,
        compile=compile,
        variant=variant or [],
        time_budget=time_budget,
        skip_kernels=skip_kernels,
        peak_flops=peak_flops,
        out=out,
    )


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    """The command line (default: the process's); ``--help`` and usage errors exit."""
    return commandline.run(app, commandline.bare_option(argv, "--reference-compile", "default"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with these command-line arguments (default: the process's); returns the report."""
    return run(parse_args(argv))


@dataclass(frozen=True)
class Plan:
    """The command line resolved on this device (bad variants fail here, before any work)."""

    device: torch.device
    preset: str
    fast_dtype: torch.dtype  # the service's (bf16 on GPUs)
    reference_dtype: torch.dtype
    compile_mode: str
    settings_options: EngineOptions
    eager_options: EngineOptions  # FLOPs are counted (and eager modules timed) in bf16: the bf16 floor
    variants: list[tuple[str, EngineOptions]]

    @classmethod
    def of(cls, args: BenchArgs) -> Plan:
        device = sdxl.pick_device(args.device)
        cuda = device.type == "cuda"
        compile_mode = args.compile if args.compile is not None else ("default" if cuda else "")
        settings_options = dataclasses.replace(
            EngineOptions.from_settings(get_settings().renderer), compile_mode=compile_mode
        )
        specs = args.variant or (GPU_VARIANTS if cuda else ["default"])
        return cls(
            device=device,
            preset=args.preset or (sdxl.SDXL_RANDOM if cuda else sdxl.TINY),
            fast_dtype=sdxl.pick_dtype(device),
            reference_dtype=torch.float16 if cuda else torch.float32,
            compile_mode=compile_mode,
            settings_options=settings_options,
            eager_options=dataclasses.replace(settings_options, compile_mode="", fp8=False),
            variants=[parse_variant(spec, settings_options) for spec in specs],
        )


def run(args: BenchArgs) -> dict[str, Any]:
    """The whole benchmark: the reference, the eager measurements, then every variant; returns the report
    (also written under ``args.out`` after every variant, and printed at the end)."""
    began = time.perf_counter()
    plan = Plan.of(args)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = get_settings().models.cache_dir
    pipes = build_pipes(plan.preset, plan.device, plan.reference_dtype, cache_dir)
    note(f"built {plan.preset} in {time.perf_counter() - began:.0f} s")
    size = args.resolution or pipes.resolution
    references = time_references(
        pipes,
        frames=args.reference_frames,
        steps=args.steps,
        size=size,
        fraction=args.high_noise_fraction,
        compile_mode=args.reference_compile,
    )
    pipes = cast(pipes, plan.fast_dtype)
    mid = model_id(plan.preset, get_settings().renderer.model_paths, cache_dir)
    # The renderer's compile cache: compiled variants load what warm_cache (or an earlier run) stored,
    # and compile_mode "auto" (--variant best=compile_mode:auto) runs the mode warm_cache timed fastest.
    cache = renderer_compile_cache(get_settings().renderer, open_store(get_settings().storage), cache_dir)
    engine = SDXLEngine(pipes, model_id=mid, options=plan.eager_options, reversible=True, compile_cache=cache)
    report = measure_eager(engine, args, plan, size, references)
    run_variants(
        engine,
        plan.variants,
        report,
        began=began,
        time_budget=args.time_budget,
        write=partial(write_report, report, args.out, began),
        frames=args.frames,
        steps=args.steps,
        size=size,
        fraction=args.high_noise_fraction,
        batch_size=report["flops"]["batch_size"],
    )
    engine.uncompile()
    report["compile_cache"] = cache.report()
    print(write_report(report, args.out, began))
    return report


def measure_eager(
    engine: SDXLEngine, args: BenchArgs, plan: Plan, size: int, references: tuple[dict | None, dict | None]
) -> dict[str, Any]:
    """The report so far: the references, and what the eager engine measures (FLOPs and module times,
    the GEMM rate, FP8 precision, the floors; the kernels alone unless ``--skip-kernels``)."""
    params = resolve_options(
        RenderOptions(
            steps=args.steps, high_noise_fraction=args.high_noise_fraction, width=size, height=size
        ),
        preset=plan.preset,
        resolution=size,
        default_batch_size=args.batch_size,
        compile_default=False,
    )
    split = engine.step_split(params)
    batch = args.batch_size or engine.auto_batch_size(params, max_batch=8, cpu_batch=4)
    flops = eager_flops(engine, params, batch)
    gemm = gemm_flops_per_second(plan.device, plan.fast_dtype)
    precision = fp8_precision(engine, params, batch)
    peak, peak_source = bf16_peak(args.peak_flops, plan.device, gemm)
    reference, reference_compiled = references
    report: dict[str, Any] = {
        "preset": plan.preset,
        "size": size,
        "steps": args.steps,
        "high_noise_fraction": args.high_noise_fraction,
        "step_split": [split.base, split.refiner],
        "compile": plan.compile_mode,
        "dtype": str(plan.fast_dtype).removeprefix("torch."),
        "reference_dtype": str(plan.reference_dtype).removeprefix("torch."),
        "reference": reference,
        "reference_compiled": reference_compiled,
        "eager_options": plan.eager_options.describe(),
        "variants": [],
        "service": None,
        "service_variant": None,
        "flops": flops,
        "gemm": gemm,
        "fp8_precision": precision,
        "peak_flops": peak,
        "peak_source": peak_source,
        "env": environment(plan.device),
        "floor_seconds_per_image": floor_seconds_per_image(flops["per_image"], peak, gemm),
    }
    if not args.skip_kernels:
        report["attention_kernels"] = time_attention(plan.device, plan.fast_dtype)
        report["vae_layouts"] = time_vae_layouts(engine, batch, size)
        note("timed the SDPA kernels and the VAE layouts")
    return report
